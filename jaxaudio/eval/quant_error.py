"""What int8 weights (`jaxaudio.layers.quant`, as `optim.frozen_storage="part=int8"` stores
a frozen part) do to a converted model's outputs.

Every `Dense` kernel of the model (found by tracing its init, `layers.dense.abstract_init`)
becomes int8 with one float32 scale per output channel (`quant.quantize` over
`quant.kernel_reduce_axes`); the other parameters (embeddings, norms, biases) stay float32,
or, with `others="bfloat16"`, are rounded to bf16 as `frozen_storage=int8` stores them. The
model then runs in float32 on one fixed input (`batch x length` token ids drawn from `seed`)
with the float32 weights and with the int8 ones, and the outputs are compared:

- `max_abs`: max |int8 - fp32| over every output element;
- `rel_rms`: RMS(int8 - fp32) / RMS(fp32);
- causal LMs (`Llama`, logits `[batch, len, vocab]`): `top1_agreement`, the fraction of
  positions whose most likely next token is the same, and `mean_kl`, KL(fp32 || int8) of
  the next-token distributions in nats, averaged over the positions;
- `Bert`: the last hidden state `[batch, len, hidden]`.

`weight_rel_rms` is the kernels' own error, ||w - dequant(q)|| / ||w|| over all of them;
`int8_fraction` the share of the parameters that went to int8.

    report = measure_checkpoint("converted/llama", length=32, seed=0)
    print(format_report(report))
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxaudio.convert.engine import flatten, unflatten
from jaxaudio.layers import quant
from jaxaudio.layers.dense import abstract_init

# Model class -> what its output is called in the report.
SUPPORTED = {"Llama": "logits", "Bert": "last_hidden_state"}
OTHERS = ("float32", "bfloat16")


class QuantErrorInputError(ValueError):
    """A checkpoint or setting this measurement cannot take; the message says which."""


def dense_kernels(module: Any) -> dict[str, tuple[int, int]]:
    """`{'/'-joined path inside params: (n_in, n_out)}` of every Dense kernel of `module`."""
    _, kernels = abstract_init(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    return kernels


def int8_params(params: dict[str, Any], kernels: dict[str, tuple[int, int]], others: str = "float32",
                quantize: Callable[[np.ndarray, tuple[int, ...]], quant.QTensor] = quant.quantize
                ) -> tuple[dict[str, Any], dict[str, float]]:
    """`params` (float32 numpy) with every kernel in `kernels` as a `QTensor` (`quantize`,
    per output channel) and the other float leaves in `others`; and the counts: parameters,
    int8 parameters, kernels, bytes before and after, the kernels' relative error."""
    if others not in OTHERS:
        raise QuantErrorInputError(f"others={others!r}: choose one of {OTHERS}")
    flat = flatten(params)
    missing = sorted(set(kernels) - set(flat))
    if missing:
        raise QuantErrorInputError(f"Dense kernels not in the checkpoint's params: {missing[:5]}")
    out: dict[str, Any] = {}
    n_int8 = n_bytes = 0
    err2 = ref2 = 0.0
    for path, w in flat.items():
        w = np.asarray(w)
        if path in kernels:
            n_in, n_out = kernels[path]
            qt = quantize(w.astype(np.float32), quant.kernel_reduce_axes(w.ndim, n_in, n_out))
            qt = quant.QTensor(q=np.asarray(qt.q), scale=np.asarray(qt.scale))
            diff = qt.dequantize(np.float32) - w.astype(np.float32)
            err2 += float(np.sum(np.square(diff, dtype=np.float64)))
            ref2 += float(np.sum(np.square(w, dtype=np.float64)))
            n_int8 += w.size
            n_bytes += qt.q.nbytes + qt.scale.nbytes
            out[path] = qt
        elif others == "bfloat16" and np.issubdtype(w.dtype, np.floating):
            out[path] = np.asarray(jnp.asarray(w, jnp.bfloat16))
            n_bytes += out[path].nbytes
        else:
            out[path] = w
            n_bytes += w.nbytes
    n = sum(int(np.asarray(w).size) for w in flat.values())
    counts = {"parameters": n, "int8_parameters": n_int8, "int8_fraction": n_int8 / max(n, 1),
              "kernels": len(kernels), "fp32_bytes": 4 * n, "stored_bytes": n_bytes,
              "weight_rel_rms": float(np.sqrt(err2 / ref2)) if ref2 > 0 else 0.0}
    return unflatten(out), counts


def token_ids(vocab_size: int, batch: int, length: int, seed: int) -> np.ndarray:
    """`[batch, length]` int32 ids drawn uniformly from the vocabulary."""
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, length)).astype(np.int32)


def forward(module: Any, variables: dict[str, Any], input_ids: np.ndarray) -> np.ndarray:
    """The compared output in float32: LLaMA's logits, BERT's last hidden state."""
    name = type(module).__name__
    mask = jnp.ones(input_ids.shape, jnp.int32)

    def apply(v, ids):
        out = module.apply(v, ids, attention_mask=mask)
        return out if name == "Llama" else out.last_hidden_state
    return np.asarray(jax.jit(apply)(variables, jnp.asarray(input_ids)), np.float32)


def compare(ref: np.ndarray, got: np.ndarray, logits: bool) -> dict[str, float]:
    """The error of `got` against `ref` (see the module docstring); `logits`: `[..., vocab]`
    next-token logits, which adds top-1 agreement and the mean KL(ref || got)."""
    ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    diff = got64 - ref64
    report = {"max_abs": float(np.max(np.abs(diff))),
              "rel_rms": float(np.sqrt(np.mean(diff ** 2)) / max(np.sqrt(np.mean(ref64 ** 2)), 1e-30)),
              "ref_rms": float(np.sqrt(np.mean(ref64 ** 2)))}
    if logits:
        def log_softmax(x):
            x = x - x.max(-1, keepdims=True)
            return x - np.log(np.sum(np.exp(x), -1, keepdims=True))
        lp, lq = log_softmax(ref64), log_softmax(got64)
        report["top1_agreement"] = float(np.mean(np.argmax(ref64, -1) == np.argmax(got64, -1)))
        report["mean_kl"] = float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))
        report["positions"] = int(np.prod(ref64.shape[:-1]))
    return report


def float32_variables(variables: dict[str, Any]) -> dict[str, Any]:
    """Every float leaf as a float32 numpy array (a bf16 checkpoint: its values, upcast)."""
    return jax.tree.map(lambda a: np.asarray(a, np.float32) if jnp.issubdtype(np.asarray(a).dtype, jnp.floating)
                        else np.asarray(a), variables)


def measure(module: Any, variables: dict[str, Any], *, length: int = 32, seed: int = 0, batch: int = 4,
            others: str = "float32",
            quantize: Callable[[np.ndarray, tuple[int, ...]], quant.QTensor] = quant.quantize) -> dict[str, Any]:
    """fp32 against int8 weights for one module (`Llama` or `Bert`) and its variables."""
    name = type(module).__name__
    if name not in SUPPORTED:
        raise QuantErrorInputError(f"the checkpoint holds a {name}; quant_error takes {' or '.join(SUPPORTED)}")
    if length < 1 or batch < 1:
        raise QuantErrorInputError(f"length={length}, batch={batch}: both must be at least 1")
    limit = getattr(module, "max_position_embeddings", None)
    if name == "Bert" and length > limit:
        raise QuantErrorInputError(f"length={length} exceeds this BERT's max_position_embeddings={limit}")
    if hasattr(module, "dtype"):
        module = module.clone(dtype=jnp.float32)  # float32 compute either way
    ref_vars = float32_variables(variables)
    params, counts = int8_params(ref_vars["params"], dense_kernels(module), others, quantize)
    int8_vars = {**ref_vars, "params": params}
    ids = token_ids(module.vocab_size, batch, length, seed)
    ref = forward(module, ref_vars, ids)
    got = forward(module, int8_vars, ids)
    return {"model": name, "output": SUPPORTED[name], "output_shape": list(ref.shape), "batch": batch,
            "length": length, "seed": seed, "others": others, **counts,
            **compare(ref, got, logits=name == "Llama")}


def load_module(checkpoint: str) -> tuple[Any, dict[str, Any]]:
    """The module of a converted checkpoint and its config.json, before its variables are
    read (an unsupported model is refused without loading them)."""
    from jaxaudio.convert.hf import converted_module
    from jaxaudio.convert.io import read_converted_config
    if not os.path.isdir(checkpoint):
        raise QuantErrorInputError(f"--checkpoint={checkpoint}: no such directory")
    config = read_converted_config(checkpoint)
    module = converted_module(config, checkpoint)
    if type(module).__name__ not in SUPPORTED:
        raise QuantErrorInputError(f"--checkpoint={checkpoint} holds a {type(module).__name__} (model "
                                   f"{config['model']!r}); quant_error takes {' or '.join(SUPPORTED)}")
    return module, config


def measure_checkpoint(checkpoint: str, *, length: int = 32, seed: int = 0, batch: int = 4,
                       others: str = "float32") -> dict[str, Any]:
    """`measure` on a checkpoint written by `launch/convert.py`."""
    from jaxaudio.convert import load_converted
    module, config = load_module(checkpoint)
    variables, _ = load_converted(checkpoint)
    report = measure(module, variables, length=length, seed=seed, batch=batch, others=others)
    return {"checkpoint": os.path.abspath(checkpoint), "checkpoint_dtype": config.get("dtype", "float32"), **report}


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"{r['model']} ({r.get('checkpoint', '')}), float32 compute, input {r['batch']} x {r['length']} random "
        f"token ids (seed {r['seed']})",
        f"  int8: {r['kernels']} Dense kernels, {r['int8_parameters']:,} of {r['parameters']:,} parameters "
        f"({100 * r['int8_fraction']:.1f}%); other parameters {r['others']}; "
        f"{r['fp32_bytes'] / 2 ** 20:.1f} MiB -> {r['stored_bytes'] / 2 ** 20:.1f} MiB",
        f"  kernels' own error ||w - q*scale|| / ||w||: {r['weight_rel_rms']:.3e}",
        f"  {r['output']} {r['output_shape']}: max |delta| {r['max_abs']:.4g}, relative RMS error "
        f"{r['rel_rms']:.3e} (fp32 RMS {r['ref_rms']:.4g})",
    ]
    if "top1_agreement" in r:
        lines.append(f"  next token: top-1 agreement {100 * r['top1_agreement']:.2f}% of {r['positions']} positions, "
                     f"mean KL(fp32 || int8) {r['mean_kl']:.3e} nats")
    return "\n".join(lines)
