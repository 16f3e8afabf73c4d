"""`python -m launch.quant_error` end to end: a tiny LLaMA (`LlamaForCausalLM`, grouped kv
heads, separate lm_head) and a tiny `BertModel` from transformers, `save_pretrained`,
converted by `python -m launch.convert`, measured by the launcher.

The reported error must be small against a yardstick that moves with the model: what
zeroing a single kernel does to the same outputs (computed here, in process). A quantizer
that drops the scales, rounds badly or takes its scales over the wrong axes fails these
bounds (`test_the_bounds_catch_a_broken_quantizer`); one that does nothing fails their lower
ends (the kernels' and the outputs' error must be above zero).
"""
import functools
import json

import numpy as np
import pytest
import torch

from jaxaudio.convert.engine import flatten, unflatten
from jaxaudio.convert.hf import load_pretrained
from jaxaudio.eval import quant_error as qe
from jaxaudio.layers import quant
from launch_util import run_module

LENGTH, BATCH, SEED = 16, 2, 3
LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=False)
BERT = dict(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64, initializer_range=0.2)
# The kernels zeroed for the yardstick: one mid-network projection each.
ZEROED = {"llama": "layers_1/attn/out/kernel", "bert": "layers_1/output/kernel"}
BOUND = 0.15  # int8's relative RMS error of the outputs must stay below this fraction of the zeroed kernel's


def _save_hf(kind: str, path: str) -> dict[str, int]:
    """A random transformers model saved at `path`; its parameter counts (all, Linear weights)."""
    import transformers
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    else:
        model = transformers.BertModel(transformers.BertConfig(**BERT))
    model.eval().save_pretrained(path, safe_serialization=True)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return {"parameters": sum(p.numel() for p in model.parameters()), "linear": linear}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`{kind: (converted dir, HF counts)}` for llama and bert, through the convert launcher."""
    root = tmp_path_factory.mktemp("quant_error")
    out = {}
    for kind in ("llama", "bert"):
        counts = _save_hf(kind, str(root / f"hf_{kind}"))
        proc = run_module("launch.convert", f"--source={root / f'hf_{kind}'}", f"--output={root / kind}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[kind] = (str(root / kind), counts)
    return out


@functools.lru_cache(maxsize=None)
def _loaded(path: str):
    module, variables = load_pretrained(path)
    return module, qe.float32_variables(variables)


def _zeroed_kernel_error(path: str, kernel: str) -> dict[str, float]:
    """The output error of the float32 model with one kernel set to zero."""
    module, variables = _loaded(path)
    flat = flatten(variables["params"])
    assert kernel in flat, sorted(flat)
    flat[kernel] = np.zeros_like(flat[kernel])
    ids = qe.token_ids(module.vocab_size, BATCH, LENGTH, SEED)
    ref = qe.forward(module, variables, ids)
    got = qe.forward(module, {**variables, "params": unflatten(flat)}, ids)
    return qe.compare(ref, got, logits=type(module).__name__ == "Llama")


def _launch(path: str, tmp_path, *extra: str) -> dict:
    out = tmp_path / "report.json"
    proc = run_module("launch.quant_error", f"--checkpoint={path}", f"--length={LENGTH}", f"--batch={BATCH}",
                      f"--seed={SEED}", f"--json={out}", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "relative RMS error" in proc.stdout and f"{report['rel_rms']:.3e}" in proc.stdout, proc.stdout
    return report


def _check_common(report: dict, counts: dict[str, int], zeroed: dict[str, float]):
    assert all(np.isfinite(v) for v in report.values() if isinstance(v, float)), report
    # Every Linear of the source went to int8 (LLaMA: q/k/v/o, gate/up/down, lm_head;
    # BERT: q/k/v/out, intermediate, output, pooler), nothing else.
    assert report["parameters"] == counts["parameters"]
    assert report["int8_parameters"] == counts["linear"]
    assert report["int8_fraction"] == pytest.approx(counts["linear"] / counts["parameters"])
    # Per-channel absmax int8 of Gaussian weights: ||w - q s|| / ||w|| ~ (max|w| / std) / (127 sqrt 12) ~ 0.7%.
    assert 2e-3 < report["weight_rel_rms"] < 1.5e-2, report
    # The tiny LLaMA (weights std 0.2) amplifies the kernels' 0.6% to ~3.5% on the logits; BERT ~2%.
    assert 0 < report["rel_rms"] < 0.08, report
    # Far below what losing one of the 15 (13) kernels does (55% on the LLaMA's logits, 105% on BERT's
    # output; a broken quantizer: 70% and more, see below).
    assert report["rel_rms"] < BOUND * zeroed["rel_rms"], (report, zeroed)
    assert report["max_abs"] < 0.2 * zeroed["max_abs"], (report, zeroed)


def test_llama(converted, tmp_path):
    path, counts = converted["llama"]
    report = _launch(path, tmp_path)
    zeroed = _zeroed_kernel_error(path, ZEROED["llama"])
    assert report["model"] == "Llama" and report["output_shape"] == [BATCH, LENGTH, LLAMA["vocab_size"]]
    assert report["kernels"] == 7 * LLAMA["num_hidden_layers"] + 1
    _check_common(report, counts, zeroed)
    assert report["positions"] == BATCH * LENGTH
    assert report["top1_agreement"] >= 0.85 and report["top1_agreement"] > zeroed["top1_agreement"], (report, zeroed)
    assert 0 < report["mean_kl"] < 0.05 * zeroed["mean_kl"], (report, zeroed)

    # bf16 for the rest (embeddings, norms), as frozen_storage=int8 stores them: a little more error,
    # a smaller model.
    both = _launch(path, tmp_path, "--others=bfloat16")
    assert both["stored_bytes"] < report["stored_bytes"] < report["fp32_bytes"] / 2
    assert report["rel_rms"] < both["rel_rms"] < BOUND * zeroed["rel_rms"], (report, both)


def test_bert(converted, tmp_path):
    path, counts = converted["bert"]
    report = _launch(path, tmp_path)
    zeroed = _zeroed_kernel_error(path, ZEROED["bert"])
    assert report["model"] == "Bert" and report["output"] == "last_hidden_state"
    assert report["output_shape"] == [BATCH, LENGTH, BERT["hidden_size"]]
    assert "top1_agreement" not in report
    _check_common(report, counts, zeroed)


def _broken(kind: str):
    """Quantizers with one mistake each (same interface as `quant.quantize`)."""
    def no_scale(w, axes):  # the scale forgotten: q in its int8 grid, read as the kernel
        return quant.QTensor(q=quant.quantize(w, axes).q, scale=np.ones_like(quant.quantize(w, axes).scale))

    def truncating(w, axes):  # toward zero instead of to nearest, and a 4-bit grid
        qt = quant.quantize(w, axes)
        q = (np.trunc(qt.q.astype(np.float32) / 16) * 16).astype(np.int8)
        return quant.QTensor(q=q, scale=qt.scale)

    def per_input_channel(w, axes):  # the absmax over the output axes, applied as if per output
        n_out = w.ndim - max(axes) - 1
        wrong = tuple(range(w.ndim - n_out, w.ndim))
        qt = quant.quantize(w, wrong)
        s = np.max(np.abs(w), axis=axes, keepdims=True) / 127
        return quant.QTensor(q=qt.q, scale=s.astype(np.float32))

    return {"no_scale": no_scale, "truncating_4bit": truncating, "per_input_channel": per_input_channel}[kind]


@pytest.mark.parametrize("mistake", ["no_scale", "truncating_4bit", "per_input_channel"])
def test_the_bounds_catch_a_broken_quantizer(converted, mistake):
    """The bounds of `_check_common` reject what a broken quantizer reports (in process, the
    launcher's own function with the quantizer swapped)."""
    path, _ = converted["llama"]
    module, variables = _loaded(path)
    zeroed = _zeroed_kernel_error(path, ZEROED["llama"])
    good = qe.measure(module, variables, length=LENGTH, seed=SEED, batch=BATCH)
    bad = qe.measure(module, variables, length=LENGTH, seed=SEED, batch=BATCH, quantize=_broken(mistake))
    assert good["rel_rms"] < BOUND * zeroed["rel_rms"]
    assert not (bad["rel_rms"] < BOUND * zeroed["rel_rms"] and bad["max_abs"] < 0.2 * zeroed["max_abs"]
                and 2e-3 < bad["weight_rel_rms"] < 1.5e-2), (mistake, bad, zeroed)


def _one_line_error(proc, *needles: str):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert all(n in last for n in needles), proc.stderr[-2000:]


def test_bad_inputs_are_one_line(converted, tmp_path):
    _one_line_error(run_module("launch.quant_error", f"--checkpoint={tmp_path / 'nope'}"), "no such directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(run_module("launch.quant_error", f"--checkpoint={empty}"), "no config.json")
    # A converted Whisper encoder: refused by class, before any variables are read (there are none).
    from transformers import WhisperConfig

    from jaxaudio.convert.whisper import config_from_hf
    whisper = tmp_path / "whisper"
    whisper.mkdir()
    kwargs = config_from_hf(WhisperConfig(d_model=64, encoder_layers=1, encoder_attention_heads=4,
                                          encoder_ffn_dim=128, max_source_positions=100).to_dict())
    (whisper / "config.json").write_text(json.dumps({"model": "whisper", "kwargs": kwargs}))
    _one_line_error(run_module("launch.quant_error", f"--checkpoint={whisper}"), "WhisperEncoder", "Llama or Bert")
    # A checkpoint of an original repository's format (no model/kwargs): named as such.
    (tmp_path / "spatial").mkdir()
    (tmp_path / "spatial" / "config.json").write_text(json.dumps({"depth": 2}))
    _one_line_error(run_module("launch.quant_error", f"--checkpoint={tmp_path / 'spatial'}"),
                    "not a converted Hugging Face model")
    path, _ = converted["bert"]
    _one_line_error(run_module("launch.quant_error", f"--checkpoint={path}", "--length=100"),
                    "max_position_embeddings=64")
