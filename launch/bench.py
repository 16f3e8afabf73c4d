"""Benchmarks against PyTorch in the same run: the Spatial-AST train step, and the forward
pass of each converted backbone against transformers (`launch/bench_backbones.py`), and of
BEATs against a PyTorch BEATs of our own (`launch/bench_beats.py`).

    python -m launch.bench --model=backbones --steps=5            # whisper, bert, llama, ast forwards
    python -m launch.bench --model=llama_100m --batch=8
    python -m launch.bench --model=beats --steps=3 --warmup=1
    python -m launch.bench --model=clap       # CLAP towers vs transformers, index search vs faiss, build
    python -m launch.bench --model=spatial_ast --size=tiny --batch=8 --steps=10 --warmup=2
    python -m launch.bench --size=both --steps=3 --warmup=1 --json=/tmp/bench.json
    python -m launch.bench --size=full --batch=64 --dtype=bfloat16 --notorch     # on a GPU

The JAX step is the trainer's own: `make_train_step` over the task built from
`configs/spatial_ast{,_tiny}.py`, the config's optimizer (`make_optimizer`: AdamW, layer
decay, clipping, frozen position embedding), the state from `create_sharded_state` on a
mesh of one device (`--all_devices` for all), jitted with donation, on random binaural
waveforms of the config's clip length. The PyTorch reference is a compact module of the
same architecture and size (torch.stft front end with the same mel matrix, BatchNorm,
conv stem, patch conv, patch masking, pre-LN ViT blocks with
`scaled_dot_product_attention`, the 4 heads, the same loss) trained with AdamW on the
same batch. It is a speed reference: its shapes and FLOPs match, its numbers need not.
Both front ends take an FFT (`stft_method="fft"`, the default; the original's dense
DFT-matrix product is `--config.model.stft_method=matmul`, kept for TPUs).

The two take turns, as the backbone benchmarks do (`take_turns`): `--warmup` untimed
steps each (JAX compiles ahead of them), then `--steps` rounds of one step each, who goes
first alternating, each step waited for (`block_until_ready` / `cuda.synchronize`), so
that a machine's drift falls on both; ms/step is the median. PyTorch runs in a spawned
process of its own (`TorchWorker`) with `torch.set_num_threads(os.cpu_count())`
(`--torch_threads`). On a CPU that other processes share, torch's OpenMP threads
degrade badly (steps several times slower and erratic) while XLA's pool degrades
gently: the load average is printed and stored, and `--torch_threads=1` is the steadier
torch number there.
On a GPU (or with `--peak_tflops`) model FLOPs utilisation is printed as
XLA cost-analysis FLOPs of the compiled step / step time / device peak.
"""
import importlib.metadata
import json
import math
import os
import statistics
import time
from typing import Any

from absl import app, flags

from launch.bench_backbones import BACKBONES, format_rows, run as run_backbone, time_both  # noqa: E402
from launch.bench_beats import SIZES as BEATS, run as run_beats  # noqa: E402

CLAP_PARTS = ("clap", "clap_search", "clap_build")
_MODEL = flags.DEFINE_enum("model", "spatial_ast", ["spatial_ast", "backbones", *BACKBONES, *BEATS, *CLAP_PARTS],
                           "spatial_ast: the train step; backbones (all) or one backbone: the forward pass "
                           "(beats: against our own PyTorch BEATs, launch/bench_beats.py); clap: its two towers "
                           "(clap_audio, clap_text), index search against faiss (clap_search) and the index "
                           "build rate (clap_build), launch/bench_index.py.")
_INDEX_SIZES = flags.DEFINE_list("index_sizes", ["100000", "1000000"], "clap_search: database rows (512-d).")
_QUERIES = flags.DEFINE_integer("queries", 256, "clap_search: queries per search call.")
_BUILD_CLIPS = flags.DEFINE_integer("build_clips", 32, "clap_build: 10 s clips to index.")
_SIZE = flags.DEFINE_enum("size", "tiny", ["tiny", "full", "both"],
                          "tiny = configs/spatial_ast_tiny.py, full = configs/spatial_ast.py (ViT-B, 10 s clips).")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch size (default: tiny 8, full 2 on CPU / 32 on accelerators).")
_STEPS = flags.DEFINE_integer("steps", None, "Timed steps (default: tiny 10, full 3 on CPU / 20 on accelerators).")
_WARMUP = flags.DEFINE_integer("warmup", None, "Untimed steps before the timed ones, at least 1 (JAX compiles "
                               "ahead of them; torch's first step is slow) (default: tiny 2, full 1 / 3).")
_TORCH = flags.DEFINE_bool("torch", True, "Also benchmark the PyTorch reference and print the ratio.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Compute dtype of both frameworks (parameters stay float32; torch uses autocast). "
                           "Default: float32 on CPU, bfloat16 on accelerators.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0: os.cpu_count()).")
_ALL_DEVICES = flags.DEFINE_bool("all_devices", False, "Data-parallel over all devices instead of one device.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per device for MFU (default: looked up for "
                           "H100/H200/A100 by device_kind; MFU is skipped on unknown devices).")
_XLA_OPTIONS = flags.DEFINE_string(
    "xla_options", "auto", "Backbone forwards: 'auto' compiles under each of jaxaudio.autotune's candidates for "
    "this platform and keeps the fastest (on CPU: ynnpack, XLA's default, and eigen); or one candidate's name.")
_JSON = flags.DEFINE_string("json", None, "Write the results here as json.")

DEFAULTS = {  # (batch, steps, warmup) per size: CPU, accelerator
    "tiny": {"cpu": (8, 10, 2), "accel": (64, 20, 3)},
    "full": {"cpu": (2, 3, 1), "accel": (32, 20, 3)},
}


def get_config(size: str):
    if size == "tiny":
        from configs import spatial_ast_tiny
        return spatial_ast_tiny.get_config()
    from configs import spatial_ast
    return spatial_ast.get_config()


def random_batch(task, batch: int, seed: int = 0) -> dict[str, Any]:
    """Random binaural waveforms of the config's clip length and random targets."""
    import numpy as np
    m = task.model
    rng = np.random.default_rng(seed)
    return {
        "wave": (0.1 * rng.standard_normal((batch, 2, task.samples))).astype(np.float32),
        "labels": (rng.random((batch, m.num_classes)) < 0.1).astype(np.float32),
        "distance": rng.integers(0, m.num_distance_bins, batch).astype(np.int32),
        "azimuth": rng.integers(0, m.num_azimuth_bins, batch).astype(np.int32),
        "elevation": rng.integers(0, m.num_elevation_bins, batch).astype(np.int32),
    }


# --- JAX -----------------------------------------------------------------------------------
def jax_train_step(config, batch: int, all_devices: bool):
    """The trainer's step, compiled, on a random batch: (call, finish). `call()` runs one
    step (waited for); `finish()` checks the last loss and returns it with the compile
    time, FLOP counts and parameter count."""
    import flax.linen as nn
    import jax

    from jaxaudio.layers.dense import abstract_init
    from jaxaudio.layers.partitioning import DEFAULT_RULES
    from jaxaudio.tasks import get_task
    from jaxaudio.train.flops import compiled_flops, spatial_ast_train_flops
    from jaxaudio.train.loop import make_train_step
    from jaxaudio.train.mesh import batch_sharding, make_mesh
    from jaxaudio.train.optim import make_optimizer, resolve_total_steps, storage_dtypes, trainable_mask
    from jaxaudio.train.state import create_sharded_state

    task = get_task(config.task)(config)  # no prepare_data(): the batch is random
    mesh = make_mesh({"data": -1} if all_devices else {"data": 1})
    if batch % mesh.devices.size:
        raise ValueError(f"--batch={batch} must be divisible by the {mesh.devices.size} devices of the mesh")
    rng = jax.random.PRNGKey(config.seed)
    abstract, dense_kernels = abstract_init(task.init_variables, rng)
    resolve_total_steps(config)
    tx, _ = make_optimizer(config.optim, nn.unbox(abstract)["params"], task.layer_scale)
    # As in the trainer: the out_shardings place the state.
    state, shardings = create_sharded_state(task.init_variables, tx, rng, mesh, DEFAULT_RULES,
                                            storage_dtypes(config.optim, nn.unbox(abstract)["params"], dense_kernels))
    data_sh = batch_sharding(mesh)
    step_fn = make_train_step(task, tx, config.train.accum_steps, config.train.nan_guard,
                              trainable_mask(config.optim, nn.unbox(abstract)["params"]))
    jitted = jax.jit(step_fn, in_shardings=(shardings, data_sh), out_shardings=(shardings, None), donate_argnums=0)
    data = jax.device_put(random_batch(task, batch), data_sh)

    t0 = time.perf_counter()
    # Traced as the trainer traces it (`Trainer.sharding_context`): under the mesh and the
    # logical-axis rules, so the model's activation constraints take effect.
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        compiled = jitted.lower(state, data).compile()
    compile_s = time.perf_counter() - t0

    facts = dict(compile_s=compile_s, flops_per_step=compiled_flops(compiled),
                 analytic_flops_per_step=spatial_ast_train_flops(task.model, batch, task.samples)["total"],
                 num_devices=int(mesh.devices.size), params=int(sum(x.size for x in jax.tree.leaves(state.params))))
    held = {"state": state}  # the step donates its state: each call replaces it

    def call():
        held["state"], held["metrics"] = compiled(held["state"], data)
        jax.block_until_ready(held)

    def finish():
        loss = float(held["metrics"]["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"JAX train step produced a non-finite loss {loss}")
        return dict(facts, loss=loss)
    return call, finish


# --- PyTorch reference ---------------------------------------------------------------------
def build_torch_model(model_cfg: dict[str, Any]):
    """A compact PyTorch Spatial-AST with the shapes and FLOPs of `SpatialAST(**model_cfg)`."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    from jaxaudio.features.mel import mel_filterbank
    from jaxaudio.models.spatial_ast import sincos_pos_embed_2d

    c = dict(model_cfg)

    class DropPath(nn.Module):
        def __init__(self, p: float):
            super().__init__()
            self.p = p

        def forward(self, x):
            if not self.training or self.p == 0:
                return x
            keep = (torch.rand(x.shape[0], 1, 1, device=x.device) >= self.p).to(x.dtype)
            return x * keep / (1 - self.p)

    class Block(nn.Module):
        def __init__(self, d: int, heads: int, mlp: int, eps: float, drop_path: float):
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc1, self.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)
            self.drop_path = DropPath(drop_path)

        def forward(self, x):
            b, n, d = x.shape
            qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            h = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
            x = x + self.drop_path(self.proj(h.transpose(1, 2).reshape(b, n, d)))
            return x + self.drop_path(self.fc2(F.gelu(self.fc1(self.norm2(x)))))

    class TorchSpatialAST(nn.Module):
        def __init__(self):
            super().__init__()
            d, p = c["embed_dim"], c["patch_size"]
            self.grid = (c["target_frames"] // p, c["n_mels"] // p)
            self.register_buffer("window", torch.hann_window(c["n_fft"], periodic=True))
            self.register_buffer("mel", torch.from_numpy(mel_filterbank(
                c["sample_rate"], c["n_fft"], c["n_mels"], c["fmin"], c["fmax"])))  # [freq, mel]
            self.bn0 = nn.BatchNorm2d(2, affine=False)
            self.conv = nn.Conv2d(4, 1, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(1)
            self.patch_embed = nn.Conv2d(1, d, p, stride=p)
            self.register_buffer("pos_embed", torch.from_numpy(np.asarray(sincos_pos_embed_2d(d, *self.grid))))
            self.cls_tokens = nn.Parameter(0.02 * torch.randn(1, c["num_cls_tokens"], d))
            rates = np.linspace(0, c["drop_path_rate"], c["depth"])
            self.blocks = nn.ModuleList([Block(d, c["num_heads"], int(d * c["mlp_ratio"]), c["eps"], float(r))
                                         for r in rates])
            self.dis_norm, self.doa_norm, self.fc_norm = (nn.LayerNorm(d, eps=c["eps"]) for _ in range(3))
            self.head = nn.Linear(d, c["num_classes"])
            self.distance_head = nn.Linear(d, c["num_distance_bins"])
            self.azimuth_head = nn.Linear(d, c["num_azimuth_bins"])
            self.elevation_head = nn.Linear(d, c["num_elevation_bins"])
            for h in (self.head, self.distance_head, self.azimuth_head, self.elevation_head):
                nn.init.trunc_normal_(h.weight, std=2e-5)  # as the JAX model, so the losses start alike
                nn.init.zeros_(h.bias)

        def frontend(self, wave):
            b, _, t = wave.shape
            with torch.autocast(wave.device.type, enabled=False):
                spec = torch.stft(wave.reshape(b * 2, t).float(), c["n_fft"], c["hop_length"], window=self.window,
                                  center=True, pad_mode="reflect", return_complex=True)
                spec = spec.reshape(b, 2, *spec.shape[1:]).transpose(2, 3)  # [b, 2, frames, freq]
                logmel = 10.0 * torch.log10(torch.clamp(spec.abs() @ self.mel, min=1e-10))
                logmel = self.bn0(logmel)
                phase = torch.angle(spec)
                ipd = phase[:, 1] - phase[:, 0]
                x = torch.cat([logmel, torch.stack([torch.cos(ipd) @ self.mel, torch.sin(ipd) @ self.mel], 1)], 1)
                if x.shape[2] < c["target_frames"]:
                    x = F.interpolate(x, size=(c["target_frames"], c["n_mels"]), mode="bicubic", align_corners=True)
            return x  # [b, 4, target_frames, mel]

        def forward(self, wave):
            x = F.gelu(self.bn(self.conv(self.frontend(wave))))
            b = x.shape[0]
            if self.training:  # SpecAugment: one time and one frequency band, shared by the batch
                for axis, width in ((2, c["time_mask"]), (3, c["freq_mask"])):
                    size = x.shape[axis]
                    w = int(torch.rand(()) * width)
                    start = int(torch.rand(()) * (size - w))
                    idx = torch.arange(size, device=x.device)
                    keep = ~((idx >= start) & (idx < start + w))
                    x = x * keep.reshape([1, 1, -1, 1] if axis == 2 else [1, 1, 1, -1]).to(x.dtype)
            x = self.patch_embed(x).permute(0, 2, 3, 1)  # [b, grid_t, grid_f, d]
            gt, gf, d = x.shape[1], x.shape[2], x.shape[3]
            x = x + self.pos_embed.reshape(gt, gf, d).to(x.dtype)
            if self.training and (c["mask_t_prob"] > 0 or c["mask_f_prob"] > 0):
                kt, kf = int(gt * (1 - c["mask_t_prob"])), int(gf * (1 - c["mask_f_prob"]))
                ids_t = torch.rand(b, gt, device=x.device).argsort(1)[:, :kt]
                x = torch.gather(x, 1, ids_t[:, :, None, None].expand(-1, -1, gf, d))
                ids_f = torch.rand(b, gf, device=x.device).argsort(1)[:, :kf]
                x = torch.gather(x, 2, ids_f[:, None, :, None].expand(-1, kt, -1, d))
            x = x.reshape(b, -1, d)
            x = torch.cat([self.cls_tokens.expand(b, -1, -1).to(x.dtype), x], 1)
            for blk in self.blocks:
                x = blk(x)
            dis, doa, cls = self.dis_norm(x[:, 0]), self.doa_norm(x[:, 1]), self.fc_norm(x[:, 2])
            return {"classifier": self.head(cls).float(), "distance": self.distance_head(dis).float(),
                    "azimuth": self.azimuth_head(doa).float(), "elevation": self.elevation_head(doa).float()}

    return TorchSpatialAST()


def torch_loss(out, batch, weights):
    import torch.nn.functional as F
    parts = (F.binary_cross_entropy_with_logits(out["classifier"], batch["labels"]),
             F.cross_entropy(out["distance"], batch["distance"]),
             F.cross_entropy(out["azimuth"], batch["azimuth"]),
             F.cross_entropy(out["elevation"], batch["elevation"]))
    return sum(w * p for w, p in zip(weights, parts))


def torch_train_step(size: str, batch: int, dtype: str, accelerator: bool, threads: int):
    """In the torch worker (`TorchWorker`, its own process: no JAX runtime beside it): the
    reference's step on the same random batch, as (call, result)."""
    import numpy as np
    import torch

    from jaxaudio.tasks import get_task

    config = get_config(size)
    torch.set_num_threads(threads or os.cpu_count())
    torch.manual_seed(config.seed)
    device = torch.device("cuda" if accelerator and torch.cuda.is_available() else "cpu")
    task = get_task(config.task)(config)  # only for the clip length and the batch
    model = build_torch_model(config.model.to_dict()).to(device).train()
    o = config.optim
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=max(o.lr, 1e-6), betas=(o.b1, o.b2), eps=o.eps)
    data = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in random_batch(task, batch).items()}
    for k in ("distance", "azimuth", "elevation"):
        data[k] = data[k].long()
    weights = tuple(config.train.loss_weights)
    autocast = dtype == "bfloat16"
    last = {}

    def call():
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = torch_loss(model(data["wave"]), data, weights)
        loss.backward()
        if o.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        last["loss"] = loss
        last.setdefault("first_s", time.perf_counter() - t0)  # lazy initialisation included

    def result():
        loss = float(last["loss"].detach())
        if not math.isfinite(loss):
            raise FloatingPointError(f"PyTorch train step produced a non-finite loss {loss}")
        return dict(compile_s=last["first_s"], loss=loss, device=str(device), threads=torch.get_num_threads(),
                    params=int(sum(p.numel() for p in model.parameters())))
    return call, result


def _torch_has_cuda() -> bool:
    """Asked in a subprocess, so that this process never starts a CUDA context of torch's."""
    import subprocess
    import sys
    code = "import torch; print(torch.cuda.is_available())"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.strip().endswith("True")


# --- driver --------------------------------------------------------------------------------
def _row(size, framework, batch, res) -> dict[str, Any]:
    times = res.pop("times")
    ms = 1e3 * statistics.median(times) if times else float("nan")
    return dict(size=size, framework=framework, batch=batch, ms_per_step=ms, samples_per_s=1e3 * batch / ms,
                step_ms=[round(1e3 * t, 3) for t in times], **res)


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'size':<6}{'framework':<10}{'batch':>6}{'ms/step':>12}{'samples/s':>12}{'ratio':>8}"]
    for r in rows:
        ratio = f"{r['ratio']:>8.2f}" if r.get("ratio") is not None else f"{'':>8}"
        lines.append(f"{r['size']:<6}{r['framework']:<10}{r['batch']:>6}{r['ms_per_step']:>12.1f}"
                     f"{r['samples_per_s']:>12.2f}{ratio}")
    return "\n".join(lines)


def main_backbones(names: list[str], dtype: str, accel: bool, peak) -> None:
    import jax
    load_before = os.getloadavg()[0]
    if load_before > 0.5 * os.cpu_count():
        print(f"warning: load average {load_before:.1f} on {os.cpu_count()} CPUs: other processes share the "
              "machine and the timings will be slower and noisier", flush=True)
    rows = []
    for name in names:
        steps = _STEPS.value or 5
        warmup = max(1, _WARMUP.value if _WARMUP.value is not None else 2)
        print(f"[{name}] JAX {jax.devices()[0].device_kind} vs PyTorch, {dtype}, {warmup} warmup + {steps} timed "
              "forwards ...", flush=True)
        bench = run_beats if name in BEATS else run_backbone
        rows.append(bench(name, batch=_BATCH.value, steps=steps, warmup=warmup, dtype=dtype, accelerator=accel,
                          torch=_TORCH.value, torch_threads=_TORCH_THREADS.value, peak=peak,
                          xla_options=_XLA_OPTIONS.value))
    print()
    print(format_rows(rows))
    print("ratio = PyTorch ms / JAX ms (> 1: JAX faster); max|diff| = largest output difference (same weights); "
          "XLA options = the compile options used (with --xla_options=auto, each candidate's ms when tuned)")
    print(f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs")
    if _JSON.value:
        out = dict(model=_MODEL.value, device_kind=jax.devices()[0].device_kind, dtype=dtype, cpu_count=os.cpu_count(),
                   load_average=dict(before=load_before, after=os.getloadavg()[0]), jax_version=jax.__version__, results=rows)
        os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
        with open(_JSON.value, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {_JSON.value}")


def main_clap(parts: tuple[str, ...], dtype: str, accel: bool, peak) -> None:
    """`--model=clap`: the towers (as the backbones), then search against faiss, then the build rate."""
    import jax

    from launch import bench_index
    out: dict[str, Any] = {}
    if "towers" in parts:
        main_backbones(["clap_audio", "clap_text"], dtype, accel, peak)
    if "search" in parts:
        rows = []
        for n in (int(x) for x in _INDEX_SIZES.value):
            print(f"[search] {n} x 512 rows, {_QUERIES.value} queries, k=10: jaxaudio vs faiss IndexFlatIP ...",
                  flush=True)
            rows.append(bench_index.search_row(n, queries=_QUERIES.value, steps=_STEPS.value or 5,
                                               warmup=max(1, _WARMUP.value or 1), faiss=_TORCH.value))
        print()
        print(bench_index.format_search(rows))
        print("ratio = faiss ms / JAX ms (> 1: JAX faster); overlap = agreement of the two top-10 sets")
        out["search"] = rows
    if "build" in parts:
        print(f"[build] {_BUILD_CLIPS.value} clips of 10 s through an original-size CLAP ...", flush=True)
        row = bench_index.build_row(_BUILD_CLIPS.value, _BATCH.value)
        print(f"index build: {row['clips_per_s']:.2f} clips/s ({row['clips']} clips of {row['clip_seconds']:.0f} s, "
              f"batch {row['batch']}, {row['device']}, reading + features + HTSAT-tiny forward + writing)")
        out["build"] = row
    if _JSON.value and out:
        with open(_JSON.value if "towers" not in parts else _JSON.value + ".index.json", "w") as f:
            json.dump(dict(out, device_kind=jax.devices()[0].device_kind, cpu_count=os.cpu_count(),
                           jax_version=jax.__version__), f, indent=2)


def main(argv):
    del argv
    import jax

    from jaxaudio.train.flops import peak_flops
    from launch.common import setup_jax

    setup_jax(False)
    platform = jax.devices()[0].platform
    device_kind = jax.devices()[0].device_kind
    accel = platform != "cpu"
    dtype = _DTYPE.value or ("bfloat16" if accel else "float32")
    if _MODEL.value in CLAP_PARTS:
        parts = {"clap": ("towers", "search", "build"), "clap_search": ("search",), "clap_build": ("build",)}
        peak = (_PEAK.value * 1e12, f"--peak_tflops={_PEAK.value:g}") if _PEAK.value else peak_flops(device_kind, dtype)
        main_clap(parts[_MODEL.value], dtype, accel, peak)
        return
    if _MODEL.value != "spatial_ast":
        from jaxaudio.autotune import select
        try:
            select(_XLA_OPTIONS.value, platform)
        except ValueError as e:
            raise app.UsageError(f"--xla_options={_XLA_OPTIONS.value}: {e}") from None
        peak = (_PEAK.value * 1e12, f"--peak_tflops={_PEAK.value:g}") if _PEAK.value else peak_flops(device_kind, dtype)
        names = ([n for n in [*BACKBONES, *BEATS] if not n.endswith("_tiny")] if _MODEL.value == "backbones"
                 else [_MODEL.value])
        main_backbones(names, dtype, accel, peak)
        return
    sizes = ["tiny", "full"] if _SIZE.value == "both" else [_SIZE.value]
    peak = (_PEAK.value * 1e12, f"--peak_tflops={_PEAK.value:g}") if _PEAK.value else peak_flops(device_kind, dtype)

    load_before = os.getloadavg()[0]
    if load_before > 0.5 * os.cpu_count():
        print(f"warning: load average {load_before:.1f} on {os.cpu_count()} CPUs: other processes share the "
              "machine and the timings (torch's most) will be slower and noisier", flush=True)
    rows, summary = [], {}
    for size in sizes:
        d_batch, d_steps, d_warmup = DEFAULTS[size]["accel" if accel else "cpu"]
        batch, steps = _BATCH.value or d_batch, _STEPS.value or d_steps
        warmup = max(1, _WARMUP.value if _WARMUP.value is not None else d_warmup)
        config = get_config(size)
        config.model.dtype = dtype
        print(f"[{size}] JAX {platform} ({device_kind}), {dtype}, batch {batch}: "
              f"{warmup} warmup + {steps} timed steps ...", flush=True)
        jax_call, jax_finish = jax_train_step(config, batch, _ALL_DEVICES.value)
        with_torch = _TORCH.value
        if with_torch and accel and not _torch_has_cuda():
            with_torch = False
            print(f"[{size}] PyTorch reference skipped: JAX runs on {platform} but this torch build has no CUDA "
                  "(a CPU torch step at accelerator batch sizes would take minutes)", flush=True)
        elif with_torch:
            print(f"[{size}] and the PyTorch reference, batch {batch}, taking turns ...", flush=True)
        jax_times, torch_times, torch_result = time_both(
            jax_call, torch_train_step if with_torch else None, (size, batch, dtype, accel, _TORCH_THREADS.value),
            warmup, steps)
        jrow = _row(size, "jax", batch, dict(jax_finish(), times=jax_times))
        rows.append(jrow)
        if jrow["flops_per_step"]:
            # Cost analysis is of one device's program; the step time is the whole mesh's.
            jrow["tflops_per_s"] = jrow["flops_per_step"] / (jrow["ms_per_step"] / 1e3) / 1e12
            if peak:
                jrow["mfu"] = jrow["tflops_per_s"] * 1e12 / peak[0]
                jrow["peak"] = peak[1]
        if torch_result:
            trow = _row(size, "torch", batch, dict(torch_result, times=torch_times))
            rows.append(trow)
            jrow["ratio"] = jrow["samples_per_s"] / trow["samples_per_s"]
            summary[size] = jrow["ratio"]

    print()
    print(format_table(rows))
    if summary:
        print("ratio = JAX samples/s / PyTorch samples/s")
    for r in rows:
        if r["framework"] != "jax":
            continue
        fl = r["flops_per_step"]
        n = r["num_devices"]
        line = f"{r['size']}: JAX compile {r['compile_s']:.1f} s; "
        line += (f"XLA cost analysis {fl / 1e9:.1f} GFLOP/step" + (f" on each of {n} devices" if n > 1 else "")
                 if fl else "no XLA FLOP count")
        line += f" (analytic matmul/conv count {r['analytic_flops_per_step'] / 1e9:.1f} GFLOP/step in all)"
        if fl:
            line += f", {r['tflops_per_s']:.3f} TFLOP/s" + (" per device" if n > 1 else "")
        if "mfu" in r:
            line += f", MFU {100 * r['mfu']:.1f}% of {r['peak']}"
        print(line)
    if fl_missing := [r for r in rows if r["framework"] == "jax" and accel and "mfu" not in r]:
        print(f"MFU not computed for {[r['size'] for r in fl_missing]}: unknown peak for {device_kind!r} "
              "(pass --peak_tflops) or no XLA FLOP count")

    if _JSON.value:
        out = dict(model=_MODEL.value, platform=platform, device_kind=device_kind, dtype=dtype,
                   cpu_count=os.cpu_count(), load_average=dict(before=load_before, after=os.getloadavg()[0]),
                   jax_version=jax.__version__, results=rows,
                   ratio_jax_over_torch=summary)
        try:
            out["torch_version"] = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            pass
        os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
        with open(_JSON.value, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {_JSON.value}")


if __name__ == "__main__":
    app.run(main)
