"""Forward-pass benchmark of BEATs (iter3+, SALMONN's audio encoder) against a PyTorch BEATs
of our own, same weights, same input.

    python -m launch.bench --model=beats --steps=3 --warmup=1     # also part of --model=backbones
    python -m launch.bench --model=beats_tiny                     # seconds, for the test

BEATs has no transformers implementation and the original code (microsoft/unilm `beats/`)
is not part of this repository, so `TorchBEATs` below is a compact PyTorch module written
for this benchmark with the iter3+ architecture, sizes and FLOPs: a Kaldi fbank computed
in torch (frames by `unfold`, DC removal, pre-emphasis, povey window, 512-point rfft,
power, the Kaldi mel matrix, log, the recipe's normalisation), the 16x16 patch conv,
LayerNorm, `post_extract_proj`, the weight-normed grouped positional conv, and the
DeepNorm post-LN layers whose attention (`F.scaled_dot_product_attention`) takes the
gated relative position bias as its mask. Its parameters have the original state-dict
names, so a seeded random `state_dict()` converts with `jaxaudio.convert.beats.key_map`:
both frameworks run the same weights and `max_abs_diff` checks the conversion and both
forwards. `golden_max_error` loads the state dict of `tests/golden/beats_tiny.npz` (made
by the original code) into it and measures its distance to the original's features.

Timing and processes follow `launch/bench_backbones.py`: the torch reference is built and
saved (safetensors + the `BEATsConfig` fields as json) in a spawned process, JAX converts
it in this process (no torch here), and the two take turns, torch in another spawned process.
"""
import dataclasses
import json
import math
import os
import tempfile
from typing import Any

import numpy as np

from launch.bench_backbones import _in_subprocess, compile_forward, measure, torch_call

FBANK_MEAN, FBANK_STD = 15.41663, 6.55582  # the BEATs recipe's fbank statistics
SAMPLE_RATE, NUM_MEL_BINS, FRAME_LENGTH, FRAME_SHIFT, N_FFT = 16000, 128, 400, 160, 512


@dataclasses.dataclass(frozen=True)
class Size:
    cfg: dict[str, Any]  # `BEATsConfig` fields, as an original checkpoint's `cfg`
    seconds: float  # clip length of the input
    default_batch: tuple[int, int]  # CPU, accelerator


_ITER3_PLUS = dict(input_patch_size=16, embed_dim=512, conv_bias=False, encoder_layers=12, encoder_embed_dim=768,
                   encoder_ffn_embed_dim=3072, encoder_attention_heads=12, activation_fn="gelu",
                   layer_norm_first=False, deep_norm=True, conv_pos=128, conv_pos_groups=16,
                   relative_position_embedding=True, num_buckets=320, max_distance=800, gru_rel_pos=True,
                   layer_wise_gradient_decay_ratio=0.6, finetuned_model=True, predictor_class=527)
SIZES: dict[str, Size] = {
    "beats": Size(_ITER3_PLUS, 10.0, (4, 32)),  # iter3+ AS2M, 10 s clips: 62 x 8 = 496 tokens
    "beats_tiny": Size(dict(_ITER3_PLUS, embed_dim=32, encoder_layers=2, encoder_embed_dim=64,
                            encoder_ffn_embed_dim=128, encoder_attention_heads=4, conv_pos=16, conv_pos_groups=4,
                            predictor_class=5), 2.0, (2, 2)),  # the golden file's sizes; 96 tokens
}


def num_tokens(cfg: dict[str, Any], samples: int) -> int:
    p = cfg["input_patch_size"]
    return ((1 + (samples - FRAME_LENGTH) // FRAME_SHIFT) // p) * (NUM_MEL_BINS // p)


def tilted_noise(batch: int, samples: int, seed: int = 0) -> np.ndarray:
    """Noise with natural audio's spectral tilt, float32 `[batch, samples]` at std 0.1: white
    noise through 1 / (1 - 0.97 z^-1), which the fbank's pre-emphasis undoes. After the
    pre-emphasis white noise would leave the lowest mel bins ~30 dB below the rest, where
    float32 rounding alone moves the log-mel by ~1e-3 in any implementation; that noise,
    not the conversion, would dominate max_abs_diff."""
    rng = np.random.default_rng(seed)
    w = np.fft.rfft(rng.standard_normal((batch, samples)))
    z = np.exp(-2j * np.pi * np.arange(w.shape[1]) / samples)
    x = np.fft.irfft(w / (1 - 0.97 * z), samples)  # circular filtering: no start-up transient
    return (0.1 * x / x.std()).astype(np.float32)


def kaldi_mel_matrix() -> np.ndarray:
    """Kaldi's triangular mel filters float32 `[257, 128]` (20 Hz to Nyquist, mel = 1127 ln(1 + f/700),
    evaluated in float32 as Kaldi does; the Nyquist row is zero because Kaldi drops that bin)."""
    f32 = np.float32

    def mel(f):
        return f32(1127.0) * np.log(f32(1.0) + np.asarray(f, f32) / f32(700.0))

    low, high = mel(20.0), mel(SAMPLE_RATE / 2)
    step = (high - low) / f32(NUM_MEL_BINS + 1)
    edges = low + step * np.arange(NUM_MEL_BINS + 2, dtype=f32)  # left, centre, right of bank b: b, b+1, b+2
    left, centre, right = edges[None, :-2], edges[None, 1:-1], edges[None, 2:]
    m = mel(f32(SAMPLE_RATE / N_FFT) * np.arange(N_FFT // 2, dtype=f32))[:, None]
    tri = np.maximum(f32(0), np.minimum((m - left) / (centre - left), (right - m) / (right - centre)))
    return np.concatenate([tri, np.zeros((1, NUM_MEL_BINS), f32)]).astype(f32)


def build_torch_model(cfg: dict[str, Any]):
    """`TorchBEATs(wave [batch, samples], padding_mask [batch, samples] | None)` -> features
    `[batch, tokens, encoder_embed_dim]`. Only the iter3+ layout (DeepNorm post-LN, gated
    relative position bias) is built; the predictor is there for the state dict, not run."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    if cfg["layer_norm_first"] or not (cfg["deep_norm"] and cfg["relative_position_embedding"] and cfg["gru_rel_pos"]):
        raise ValueError("TorchBEATs builds the iter3+ layout only (deep_norm, gated relative position bias)")
    if cfg["activation_fn"] != "gelu":
        raise ValueError(f"TorchBEATs: activation_fn {cfg['activation_fn']!r} (only 'gelu')")
    dim, heads, p = cfg["encoder_embed_dim"], cfg["encoder_attention_heads"], cfg["input_patch_size"]
    alpha = (2 * cfg["encoder_layers"]) ** 0.25

    def reduce_mask(mask, n):
        """Padding mask `[batch, m] -> [batch, n]`, as the original: the last `m % n` entries
        are dropped and a position is padding when its whole chunk of `m // n` is."""
        mask = mask[:, :mask.shape[1] - mask.shape[1] % n]
        return mask.reshape(mask.shape[0], n, -1).all(-1)

    def buckets(length, device):
        """Bucket of key - query: half the buckets per sign, exact below a quarter, then log-spaced."""
        rel = torch.arange(length, device=device)[None, :] - torch.arange(length, device=device)[:, None]
        half = cfg["num_buckets"] // 2
        exact, dist = half // 2, rel.abs()
        log = torch.log(dist.float() / exact) / math.log(cfg["max_distance"] / exact) * (half - exact)
        far = torch.clamp(exact + log.clamp_min(0).long(), max=half - 1)  # clamp_min: no -inf cast at 0
        return (rel > 0).long() * half + torch.where(dist < exact, dist, far)

    class WeightNormConv1d(nn.Module):
        """Grouped Conv1d whose weight is `weight_g * weight_v / ||weight_v||` (norm over dims 0, 1),
        folded every call as the original's weight norm does."""

        def __init__(self):
            super().__init__()
            k = cfg["conv_pos"]
            v = torch.randn(dim, dim // cfg["conv_pos_groups"], k) * math.sqrt(4.0 / (k * dim))
            self.weight_v = nn.Parameter(v)
            self.weight_g = nn.Parameter(v.norm(dim=(0, 1), keepdim=True) * (0.5 + torch.rand(1, 1, k)))
            self.bias = nn.Parameter(0.1 * torch.randn(dim))

        def forward(self, x):
            w = self.weight_g * self.weight_v / self.weight_v.norm(dim=(0, 1), keepdim=True)
            return F.conv1d(x, w, self.bias, padding=cfg["conv_pos"] // 2, groups=cfg["conv_pos_groups"])

    class Attention(nn.Module):
        def __init__(self, rel_bias):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
            self.relative_attention_bias = rel_bias  # one table shared by every layer, as the original
            self.grep_linear = nn.Linear(dim // heads, 8)
            self.grep_a = nn.Parameter(0.5 + 1.5 * torch.rand(1, heads, 1, 1))

        def forward(self, x, pos_bias, key_pad):  # x [b, t, c], pos_bias [h, t, t] (ungated)
            b, t, _ = x.shape
            q, k, v = (f(x).view(b, t, heads, -1).transpose(1, 2) for f in (self.q_proj, self.k_proj, self.v_proj))
            # Each head's unscaled query gates the bias per token: two sigmoids of 4 summed logits.
            g = torch.sigmoid(self.grep_linear(q).view(b, heads, t, 2, 4).sum(-1))
            gate = g[..., 0] * (g[..., 1] * self.grep_a.view(1, heads, 1) - 1.0) + 2.0
            mask = gate[..., None] * pos_bias
            if key_pad is not None:
                mask = mask.masked_fill(key_pad[:, None, None, :], float("-inf"))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
            return self.out_proj(y.transpose(1, 2).reshape(b, t, dim))

    class Layer(nn.Module):
        def __init__(self, rel_bias):
            super().__init__()
            self.self_attn = Attention(rel_bias)
            self.self_attn_layer_norm, self.final_layer_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.fc1 = nn.Linear(dim, cfg["encoder_ffn_embed_dim"])
            self.fc2 = nn.Linear(cfg["encoder_ffn_embed_dim"], dim)

        def forward(self, x, pos_bias, key_pad):
            x = self.self_attn_layer_norm(alpha * x + self.self_attn(x, pos_bias, key_pad))
            h = F.gelu(self.fc1(x).float()).type_as(x)  # exact GELU in fp32, as the original
            return self.final_layer_norm(alpha * x + self.fc2(h))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_conv = nn.Sequential(WeightNormConv1d())
            self.layer_norm = nn.LayerNorm(dim)
            rel_bias = nn.Embedding(cfg["num_buckets"], heads)
            self.layers = nn.ModuleList(Layer(rel_bias) for _ in range(cfg["encoder_layers"]))
            self._buckets = {}

        def forward(self, x, key_pad):  # x [b, t, c]
            t = x.shape[1]
            if key_pad is not None:
                x = x.masked_fill(key_pad[..., None], 0.0)
            conv = self.pos_conv(x.transpose(1, 2))[..., :t]  # an even kernel yields one extra frame
            x = self.layer_norm(x + F.gelu(conv).transpose(1, 2))
            if (t, x.device) not in self._buckets:
                self._buckets = {(t, x.device): buckets(t, x.device)}
            rel = self.layers[0].self_attn.relative_attention_bias
            pos_bias = rel(self._buckets[t, x.device]).permute(2, 0, 1)  # [h, t, t], once for all layers
            for layer in self.layers:
                x = layer(x, pos_bias, key_pad)
            return x

    class TorchBEATs(nn.Module):
        def __init__(self):
            super().__init__()
            # Not persistent: the state dict keeps the original's keys only.
            self.register_buffer("window", torch.hann_window(FRAME_LENGTH, periodic=False) ** 0.85, persistent=False)
            self.register_buffer("mel", torch.from_numpy(kaldi_mel_matrix()), persistent=False)
            self.patch_embedding = nn.Conv2d(1, cfg["embed_dim"], p, stride=p, bias=cfg["conv_bias"])
            self.layer_norm = nn.LayerNorm(cfg["embed_dim"])
            if cfg["embed_dim"] != dim:
                self.post_extract_proj = nn.Linear(cfg["embed_dim"], dim)
            self.encoder = Encoder()
            if cfg["finetuned_model"]:
                self.predictor = nn.Linear(dim, cfg["predictor_class"])

        def fbank(self, wave):  # [b, samples] in [-1, 1] -> normalised log-mel [b, frames, 128], fp32
            frames = (wave.float() * 2.0 ** 15).unfold(1, FRAME_LENGTH, FRAME_SHIFT)
            frames = frames - frames.mean(-1, keepdim=True)
            frames = torch.cat([frames[..., :1] * (1 - 0.97), frames[..., 1:] - 0.97 * frames[..., :-1]], -1)
            power = torch.view_as_real(torch.fft.rfft(frames * self.window, n=N_FFT)).pow(2).sum(-1)
            logmel = torch.log(torch.clamp_min(power @ self.mel, torch.finfo(torch.float32).eps))
            return (logmel - FBANK_MEAN) / (2 * FBANK_STD)

        def forward(self, wave, padding_mask=None):
            with torch.autocast(wave.device.type, enabled=False):
                fbank = self.fbank(wave)
            x = self.patch_embedding(fbank[:, None])  # [b, embed, frames // p, 128 // p]
            x = self.layer_norm(x.flatten(2).transpose(1, 2))  # tokens time-major
            key_pad = None
            if padding_mask is not None:
                key_pad = reduce_mask(reduce_mask(padding_mask, fbank.shape[1]), x.shape[1])
            if cfg["embed_dim"] != dim:
                x = self.post_extract_proj(x)
            return self.encoder(x, key_pad)

    return TorchBEATs()


def _init_weights(model, cfg: dict[str, Any], seed: int) -> None:
    """Seeded weights at the original's initial scales: xavier-normal q/k projections and
    relative position table, DeepNorm's gain beta = (8 L)^(-1/4) on v/out/fc1/fc2, N(0, 0.02)
    for the other linear layers (fairseq's BERT init); the convolutions and grep_* keep their
    constructors' draws. Linear biases and LayerNorms are random, not 0 and 1, so that a
    missed or transposed tensor shows in max_abs_diff."""
    import torch
    gen = torch.Generator().manual_seed(seed + 1)
    beta = (8 * cfg["encoder_layers"]) ** -0.25
    xavier = ("q_proj.weight", "k_proj.weight", "relative_attention_bias.weight")
    deep = ("v_proj.weight", "out_proj.weight", "fc1.weight", "fc2.weight")
    with torch.no_grad():
        for name, t in model.named_parameters():
            noise = torch.randn(t.shape, generator=gen)
            if "layer_norm" in name:
                t.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif name.endswith(xavier + deep):
                t.copy_(noise * math.sqrt(2.0 / sum(t.shape)) * (beta if name.endswith(deep) else 1.0))
            elif name.endswith(("post_extract_proj.weight", "predictor.weight")) or (
                    name.endswith(".bias") and not name.startswith(("encoder.pos_conv", "patch_embedding"))
                    and "grep_linear" not in name):
                t.copy_(0.02 * noise)


def save_reference(name: str, directory: str, seed: int = 0) -> None:
    """The torch model with seeded random weights: `beats.safetensors` + `cfg.json` in `directory`."""
    import torch
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    cfg = SIZES[name].cfg
    model = build_torch_model(cfg)
    _init_weights(model, cfg, seed)
    # safetensors refuses shared storage: each layer's copy of the relative table is its own tensor.
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              os.path.join(directory, "beats.safetensors"))
    with open(os.path.join(directory, "cfg.json"), "w") as f:
        json.dump(cfg, f)


def load_reference(directory: str):
    """The model `save_reference` wrote, in eval mode."""
    from safetensors.torch import load_file
    with open(os.path.join(directory, "cfg.json")) as f:
        model = build_torch_model(json.load(f))
    model.load_state_dict(load_file(os.path.join(directory, "beats.safetensors")), strict=True)
    return model.eval().requires_grad_(False)


def golden_max_error(path: str) -> float:
    """Max abs difference between `TorchBEATs` and the original's features on a golden npz
    (`tests/golden/beats_tiny.npz`: its state dict, cfg, waveforms and padding mask)."""
    import torch
    g = np.load(path)
    model = build_torch_model(json.loads(str(g["cfg"])))
    model.load_state_dict({k[len("state_dict/"):]: torch.from_numpy(g[k]) for k in g.files
                           if k.startswith("state_dict/")}, strict=True)
    with torch.inference_mode():
        got = model.eval()(torch.from_numpy(g["wave"].astype(np.float32)), torch.from_numpy(g["padding_mask"]))
    return float(np.max(np.abs(got.double().numpy() - g["features"].astype(np.float64))))


def jax_forward(directory: str, wave: np.ndarray, dtype: str, xla_options: str = "auto"):
    """The converted BEATs' jitted forward (`compile_forward`)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxaudio.convert.beats import build, config_from_checkpoint, key_map
    from jaxaudio.convert.engine import convert
    from jaxaudio.convert.io import load_state_dict
    with open(os.path.join(directory, "cfg.json")) as f:
        kwargs = config_from_checkpoint(json.load(f))
    module, example = build(kwargs)
    expected = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *example))
    source = os.path.join(directory, "beats.safetensors")
    variables = convert(load_state_dict(source), key_map(module), expected, source_name=source)
    module, _ = build(dict(kwargs, dtype=jnp.dtype(dtype)))
    return compile_forward(lambda v, w: module.apply(v, w)[0], variables, wave, xla_options)


def torch_forward(directory: str, input_file: str, dtype: str, threads: int):
    """In the torch worker: load the saved reference and input; a call and its last output."""
    import torch
    torch.set_num_threads(threads or os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_reference(directory).to(device)
    wave = torch.from_numpy(np.load(input_file)).to(device)
    return torch_call(lambda: model(wave), device, dtype)


def run(name: str, *, batch: int | None, steps: int, warmup: int, dtype: str, accelerator: bool,
        torch: bool = True, torch_threads: int = 0, peak: tuple[float, str] | None = None,
        xla_options: str = "auto") -> dict[str, Any]:
    """Benchmark one BEATs size; a row with the keys of `bench_backbones.run`."""
    size = SIZES[name]
    batch = batch or size.default_batch[1 if accelerator else 0]
    samples = int(size.seconds * SAMPLE_RATE)
    wave = tilted_noise(batch, samples)
    with tempfile.TemporaryDirectory() as tmp:
        _in_subprocess(save_reference, name, tmp)
        input_file = os.path.join(tmp, "wave.npy")
        np.save(input_file, wave)
        return measure(name, batch, dtype, batch * num_tokens(size.cfg, samples), jax_forward(tmp, wave, dtype, xla_options),
                       torch_forward if torch else None, (tmp, input_file, dtype, torch_threads),
                       warmup, steps, peak)
