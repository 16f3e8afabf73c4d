"""Forward-pass benchmark of the converted backbones against transformers, same weights, same input.

Run through `launch/bench.py`:

    python -m launch.bench --model=backbones                 # all of them
    python -m launch.bench --model=llama_100m --batch=4 --steps=5

For each backbone at a realistic size, a transformers PyTorch model is built from its
config with random weights (seeded), saved with `save_pretrained`, and converted by
`jaxaudio.convert.hf.convert_hf` — the path a user's checkpoint takes. The JAX forward is
`jax.jit(module.apply)`; the PyTorch forward runs under `torch.inference_mode()` in a
fresh spawned process (so XLA's and torch's thread pools do not fight), on the same input
saved to disk. Each framework runs `warmup` untimed calls, then the two take turns for
`steps` timed rounds (who goes first alternates; the idle one waits on a pipe): a shared
CPU's speed drifts by 10-30% over minutes, which timing one framework after the other
would read as a difference between them. ms is the median. Reported: both times, the
ratio (PyTorch ms / JAX ms: > 1 means JAX is faster), tokens/s, and on a GPU XLA's FLOP
count and model FLOPs utilisation.
"""
import dataclasses
import os
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Backbone:
    hf_class: str               # transformers class to build and save
    hf_config: Callable[[], Any]
    inputs: Callable[[int, np.random.Generator], dict[str, np.ndarray]]  # batch -> named numpy inputs
    tokens: Callable[[dict[str, np.ndarray]], int]  # how many positions one forward processes
    jax_forward: Callable[[Any, Any, dict[str, Any]], Any]
    torch_forward: Callable[[Any, dict[str, Any]], Any]  # (transformers model, dict of tensors) -> tensor
    default_batch: tuple[int, int]  # CPU, accelerator


def _whisper_config(d_model, layers, heads):
    from transformers import WhisperConfig
    # The decoder is not benchmarked; one small layer keeps save/convert fast.
    return WhisperConfig(d_model=d_model, encoder_layers=layers, encoder_attention_heads=heads,
                         encoder_ffn_dim=4 * d_model, decoder_layers=1, decoder_attention_heads=heads,
                         decoder_ffn_dim=4 * d_model, num_mel_bins=80, vocab_size=51865)


def _whisper(d_model, layers, heads) -> Backbone:
    return Backbone(
        "WhisperModel", lambda: _whisper_config(d_model, layers, heads),
        lambda b, rng: {"input_features": rng.standard_normal((b, 80, 3000)).astype(np.float32)},
        lambda x: x["input_features"].shape[0] * 1500,
        lambda module, v, x: module.apply(v, x["input_features"]),
        lambda model, x: model.encoder(input_features=x["input_features"]).last_hidden_state, (1, 16))


def _bert_config():
    from transformers import BertConfig
    return BertConfig()  # bert-base-uncased's sizes


def _ids(vocab: int, length: int):
    return lambda b, rng: {"input_ids": rng.integers(0, vocab, (b, length)).astype(np.int32),
                           "attention_mask": np.ones((b, length), np.int32)}


def _llama_config():
    from transformers import LlamaConfig
    # ~134M parameters (85M in the blocks): LLaMA-2's vocabulary and layout at GPT-2-small width.
    return LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048)


def _llama_tiny_config():
    from transformers import LlamaConfig
    # A smoke-test size (seconds on a CPU): the benchmark's own test runs it.
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _ast_config():
    from transformers import ASTConfig
    return ASTConfig()  # AST-base on 1024 frames x 128 mel bins (1212 patches)


def _qformer_config(layers: int, cross_every: int, encoder_width: int):
    from transformers import Blip2QFormerConfig
    return Blip2QFormerConfig(num_hidden_layers=layers, cross_attention_frequency=cross_every,
                              encoder_hidden_size=encoder_width)


def _qformer(layers, cross_every, encoder_width, queries, frames, default_batch) -> Backbone:
    """BERT-base-wide Q-Former over `frames` encoder states: BAT's projector (8 layers, cross
    every 2nd, 64 queries over Spatial-AST's 515 tokens) or SALMONN's window Q-Former (2 layers,
    cross in each, 1 query per window of 17 fused frames: 88 windows per 30 s clip)."""
    return Backbone(
        "Blip2QFormerModel", lambda: _qformer_config(layers, cross_every, encoder_width),
        lambda b, rng: {"query_embeds": rng.standard_normal((b, queries, 768)).astype(np.float32),
                        "encoder_hidden_states": rng.standard_normal((b, frames, encoder_width)).astype(np.float32)},
        lambda x: x["encoder_hidden_states"].shape[0] * x["encoder_hidden_states"].shape[1],
        lambda module, v, x: module.apply(v, x["query_embeds"], x["encoder_hidden_states"]),
        lambda model, x: model(query_embeds=x["query_embeds"],
                               encoder_hidden_states=x["encoder_hidden_states"]).last_hidden_state,
        default_batch)


def _clap_config():
    from transformers import ClapConfig
    return ClapConfig()  # laion/clap-htsat-unfused's sizes: HTSAT-tiny + RoBERTa-base, 512-d joint space


def _clap_audio_inputs(b, rng):
    # dB-scale log-mels of 10 s at 48 kHz (1001 frames x 64 bins), one channel (unfused).
    mel = (rng.standard_normal((b, 1, 1001, 64)) * 20 - 40).astype(np.float32)
    return {"input_features": mel, "is_longer": np.zeros((b, 1), bool)}


BACKBONES: dict[str, Backbone] = {
    "whisper_base": _whisper(512, 6, 8),
    "whisper_small": _whisper(768, 12, 12),
    "bert_base": Backbone(
        "BertModel", _bert_config, _ids(30522, 128), lambda x: x["input_ids"].size,
        lambda module, v, x: module.apply(v, x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state,
        lambda model, x: model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state,
        (8, 64)),
    "llama_100m": Backbone(
        "LlamaForCausalLM", _llama_config, _ids(32000, 256), lambda x: x["input_ids"].size,
        lambda module, v, x: module.apply(v, x["input_ids"], attention_mask=x["attention_mask"]),
        lambda model, x: model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits, (4, 32)),
    "qformer_bat": _qformer(8, 2, 768, 64, 515, (8, 64)),
    "qformer_salmonn": _qformer(2, 1, 2048, 1, 17, (88, 88 * 16)),  # a batch = one 30 s clip's windows
    "llama_tiny": Backbone(
        "LlamaForCausalLM", _llama_tiny_config, _ids(128, 32), lambda x: x["input_ids"].size,
        lambda module, v, x: module.apply(v, x["input_ids"], attention_mask=x["attention_mask"]),
        lambda model, x: model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits, (2, 2)),
    "ast": Backbone(
        "ASTModel", _ast_config,
        lambda b, rng: {"input_values": rng.standard_normal((b, 1024, 128)).astype(np.float32)},
        lambda x: x["input_values"].shape[0] * 1214,
        lambda module, v, x: module.apply(v, x["input_values"])["last_hidden_state"],
        lambda model, x: model(input_values=x["input_values"]).last_hidden_state, (1, 16)),
    # CLAP's two towers through `get_{audio,text}_features` (projected, L2-normalised); tokens
    # are HTSAT's 64 x 64 first-stage patches per clip and the 77 text positions.
    "clap_audio": Backbone(
        "ClapModel", _clap_config, _clap_audio_inputs, lambda x: x["input_features"].shape[0] * 4096,
        lambda module, v, x: module.apply(v, x["input_features"], x["is_longer"][:, 0], method="audio_features"),
        lambda model, x: model.get_audio_features(input_features=x["input_features"],
                                                  is_longer=x["is_longer"]).pooler_output, (8, 64)),
    "clap_text": Backbone(
        "ClapModel", _clap_config, _ids(50265, 77), lambda x: x["input_ids"].size,
        lambda module, v, x: module.apply(v, x["input_ids"], x["attention_mask"], method="text_features"),
        lambda model, x: model.get_text_features(input_ids=x["input_ids"],
                                                 attention_mask=x["attention_mask"]).pooler_output, (32, 256)),
}


def _transformers():
    from launch.torch_compat import ensure_torchvision_importable
    ensure_torchvision_importable()
    import transformers
    return transformers


def save_reference(name: str, directory: str, seed: int = 0) -> None:
    """The transformers model with seeded random weights, `save_pretrained` to `directory`."""
    import torch
    transformers = _transformers()
    spec = BACKBONES[name]
    torch.manual_seed(seed)
    model = getattr(transformers, spec.hf_class)(spec.hf_config()).eval()
    model.save_pretrained(directory)


def jax_forward(name: str, directory: str, inputs: dict[str, np.ndarray], dtype: str, xla_options: str = "auto"):
    """The converted backbone's jitted forward; see `compile_forward`."""
    from jaxaudio.convert.hf import convert_hf, hf_module
    spec = BACKBONES[name]
    variables, config = convert_hf(directory, dtype="float32")
    kwargs = dict(config["kwargs"], dtype=dtype)
    module, _ = hf_module(config["model"]).build(kwargs)
    return compile_forward(lambda v, x: spec.jax_forward(module, v, x), variables, inputs, xla_options)


def compile_forward(fn, variables, inputs, xla_options: str = "auto"
                    ) -> tuple[Callable[[], None], dict[str, Any], Callable[[], np.ndarray]]:
    """Compile `fn(variables, inputs)` ahead: a call that runs it once (waited for), facts
    (compile seconds, XLA's FLOP count, parameter count, the XLA option set used and the
    candidates' ms) and the last (float32) output. `xla_options`: "auto" keeps the fastest
    of `jaxaudio.autotune.candidates()` (`compile_fastest`), or one candidate's name."""
    import jax
    import jax.numpy as jnp

    from jaxaudio.autotune import compile_fastest, select
    from jaxaudio.train.flops import compiled_flops
    options = select(xla_options)
    variables, x = jax.device_put(variables), jax.device_put(inputs)
    tuned = compile_fastest(jax.jit(fn).lower(variables, x), variables, x, options=options)
    for name, error in tuned.skipped.items():
        print(f"  XLA option set {name} {options[name]} did not compile, skipped: {error}", flush=True)
    compiled = tuned.compiled
    facts = dict(compile_s=tuned.compile_seconds, flops=compiled_flops(compiled),
                 params=int(sum(a.size for a in jax.tree.leaves(variables["params"]))), xla_options=tuned.name,
                 candidate_ms={k: 1e3 * v for k, v in tuned.seconds.items()})
    out = {}

    def call():
        out["y"] = compiled(variables, x)
        jax.block_until_ready(out["y"])
    return call, facts, lambda: np.asarray(jnp.asarray(out["y"], jnp.float32))


def torch_forward(name: str, directory: str, input_file: str, dtype: str, threads: int):
    """In the torch worker: load the saved model and input; a call and its last output."""
    import torch
    transformers = _transformers()
    torch.set_num_threads(threads or os.cpu_count())
    spec = BACKBONES[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = getattr(transformers, spec.hf_class).from_pretrained(directory).eval().to(device)
    data = np.load(input_file)
    x = {k: torch.from_numpy(data[k]).to(device) for k in data.files}
    return torch_call(lambda: spec.torch_forward(model, x), device, dtype)


def torch_call(forward: Callable[[], Any], device: str, dtype: str):
    """`forward()` under inference mode (and bf16 autocast), synchronised: (call, result)."""
    import torch
    out = {}
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def call():
        with torch.inference_mode(), autocast:
            out["y"] = forward()
        if device == "cuda":
            torch.cuda.synchronize()
    return call, lambda: dict(output=out["y"].float().cpu().numpy(), device=device)


def _torch_worker(conn, build, args) -> None:
    """Spawned: `build(*args)` -> (call, result); answers "run" with the seconds of one call
    and "finish" with `result()`; an exception goes back as ("error", traceback)."""
    import traceback
    try:
        call, result = build(*args)
        conn.send("ready")
        while conn.recv() == "run":
            t0 = time.perf_counter()
            call()
            conn.send(time.perf_counter() - t0)
        conn.send(result())
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the worker's traceback
        conn.send(("error", traceback.format_exc()))


class TorchWorker:
    """A spawned process holding a torch forward (`build(*args)` -> (call, result)), timed
    one call at a time so that it can take turns with JAX."""

    def __init__(self, build, *args):
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_torch_worker, args=(child, build, args), daemon=True)
        self._proc.start()
        self._receive()  # "ready"

    def _receive(self):
        while not self._conn.poll(1.0):
            if not self._proc.is_alive():
                raise RuntimeError(f"the torch benchmark worker exited (code {self._proc.exitcode}) without "
                                   "an answer; a script that starts it needs an `if __name__ == '__main__':` guard")
        msg = self._conn.recv()
        if isinstance(msg, tuple) and msg[:1] == ("error",):
            raise RuntimeError(f"the torch benchmark worker failed:\n{msg[1]}")
        return msg

    def time_call(self) -> float:
        self._conn.send("run")
        return self._receive()

    def finish(self) -> dict[str, Any]:
        self._conn.send("finish")
        result = self._receive()
        self._proc.join(60)
        return result

    def close(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()


def take_turns(jax_call: Callable[[], None], worker: TorchWorker | None, warmup: int, steps: int
               ) -> tuple[list[float], list[float]]:
    """`warmup` untimed calls of each, then `steps` rounds in which both run once (JAX first
    in even rounds, torch first in odd ones): per-call seconds of JAX and of torch."""
    def time_jax():
        t0 = time.perf_counter()
        jax_call()
        return time.perf_counter() - t0
    for _ in range(warmup):
        time_jax()
        if worker:
            worker.time_call()
    jax_times, torch_times = [], []
    for i in range(steps):
        if worker and i % 2:
            torch_times.append(worker.time_call())
        jax_times.append(time_jax())
        if worker and not i % 2:
            torch_times.append(worker.time_call())
    return jax_times, torch_times


def time_both(jax_call: Callable[[], None], torch_build, torch_args: tuple, warmup: int, steps: int
              ) -> tuple[list[float], list[float], dict[str, Any] | None]:
    """`take_turns` between `jax_call` and the torch call a `TorchWorker` builds with
    `torch_build(*torch_args)` (none if `torch_build` is None): the per-call seconds of
    each and the worker's result."""
    worker = TorchWorker(torch_build, *torch_args) if torch_build else None
    try:
        jax_times, torch_times = take_turns(jax_call, worker, warmup, steps)
        return jax_times, torch_times, worker.finish() if worker else None
    finally:
        if worker:
            worker.close()


def _in_subprocess(fn, *args):
    import concurrent.futures
    import multiprocessing
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def measure(name: str, batch: int, dtype: str, tokens: int, jax_parts, torch_build, torch_args: tuple,
            warmup: int, steps: int, peak: tuple[float, str] | None) -> dict[str, Any]:
    """Time a compiled JAX forward (`jax_parts` from `compile_forward`) and, unless
    `torch_build` is None, the torch forward a `TorchWorker` builds, taking turns; a row."""
    call, facts, jax_output = jax_parts
    jax_times, torch_times, tres = time_both(call, torch_build, torch_args, warmup, steps)
    row = dict(model=name, batch=batch, dtype=dtype, params=facts["params"], compile_s=facts["compile_s"],
               jax_ms=1e3 * statistics.median(jax_times), tokens=tokens, xla_options=facts["xla_options"],
               candidate_ms=facts["candidate_ms"])
    row["jax_tokens_per_s"] = tokens / (row["jax_ms"] / 1e3)
    if facts["flops"]:
        row["jax_tflops_per_s"] = facts["flops"] / (row["jax_ms"] / 1e3) / 1e12
        if peak:
            row["mfu"], row["peak"] = row["jax_tflops_per_s"] * 1e12 / peak[0], peak[1]
    if tres:
        row["torch_ms"] = 1e3 * statistics.median(torch_times)
        row["torch_device"] = tres["device"]
        row["ratio"] = row["torch_ms"] / row["jax_ms"]
        # Same weights, same input: a wrong conversion would show here too.
        row["max_abs_diff"] = float(np.max(np.abs(jax_output() - tres["output"])))
    return row


def run(name: str, *, batch: int | None, steps: int, warmup: int, dtype: str, accelerator: bool,
        torch: bool = True, torch_threads: int = 0, peak: tuple[float, str] | None = None,
        xla_options: str = "auto") -> dict[str, Any]:
    """Benchmark one backbone; returns a row (times in ms, ratio, tokens/s, MFU)."""
    spec = BACKBONES[name]
    batch = batch or spec.default_batch[1 if accelerator else 0]
    inputs = spec.inputs(batch, np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as tmp:
        _in_subprocess(save_reference, name, tmp)
        input_file = os.path.join(tmp, "inputs.npz")
        np.savez(input_file, **inputs)
        return measure(name, batch, dtype, spec.tokens(inputs), jax_forward(name, tmp, inputs, dtype, xla_options),
                       torch_forward if torch else None, (name, tmp, input_file, dtype, torch_threads),
                       warmup, steps, peak)


def _tuned(row: dict[str, Any]) -> str:
    """The option set used, and every timed candidate's ms: "eigen (ynnpack 951, eigen 872)"."""
    times = ", ".join(f"{k} {v:.0f}" for k, v in row["candidate_ms"].items())
    return row["xla_options"] + (f" ({times})" if times else "")


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<15}{'batch':>6}{'params':>10}{'JAX ms':>10}{'torch ms':>10}{'ratio':>8}"
             f"{'tokens/s':>12}{'max|diff|':>11}{'MFU':>7}  XLA options"]
    for r in rows:
        torch_ms = f"{r['torch_ms']:>10.1f}" if "torch_ms" in r else f"{'-':>10}"
        ratio = f"{r['ratio']:>8.2f}" if "ratio" in r else f"{'-':>8}"
        diff = f"{r['max_abs_diff']:>11.1e}" if "max_abs_diff" in r else f"{'-':>11}"
        mfu = f"{100 * r['mfu']:>6.1f}%" if "mfu" in r else f"{'-':>7}"
        lines.append(f"{r['model']:<15}{r['batch']:>6}{r['params'] / 1e6:>9.1f}M{r['jax_ms']:>10.1f}{torch_ms}"
                     f"{ratio}{r['jax_tokens_per_s']:>12.0f}{diff}{mfu}  {_tuned(r)}")
    return "\n".join(lines)
