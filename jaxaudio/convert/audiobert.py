"""AudioBERT's LoRA weights: the original's `*_LORA.pt` in, PEFT adapter directories out.

The original (HJ-Ok/AudioBERT) wraps `BertForMaskedLM` with
`get_peft_model(model, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.01,
target_modules=["query", "key", "value"]))` (no task type, so a plain `PeftModel`) and, at
the best dev accuracy, `torch.save`s the entries of `model.state_dict()` whose key contains
`lora_` (its `peft_state_dict(..., bias="LoRA")`), as `weights/{name}_{seed}_LORA.pt`:

    base_model.model.bert.encoder.layer.{n}.attention.self.{query,key,value}.lora_A.default.weight  [r, in]
    base_model.model.bert.encoder.layer.{n}.attention.self.{query,key,value}.lora_B.default.weight  [out, r]

With PEFT >= 0.7 that is all. `bias="LoRA"` also adds `<module>.bias` where the state dict has
one, which only PEFT before 0.7 had (its LoRA layer subclassed `nn.Linear`; later the base
layer sits at `<module>.base_layer`): that is the frozen base bias, so here it must equal
the BERT's bias (a check that the right base model was given) and is otherwise unused.
The AST encoder trains too but is not saved; the alpha is not recorded (the original's is 128).

Ours: `layers_{n}/attention/{query,key,value}/lora_a` `[in, r]` and `lora_b` `[r, heads,
head_dim]` beside each kernel (`jaxaudio.layers.lora`), translated by
`jaxaudio.convert.bert.MODULE_NAMES`. Exports go through `convert/peft.py`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxaudio.convert import bert
from jaxaudio.convert.engine import ConversionError, flatten, unflatten
from jaxaudio.convert.io import load_state_dict
from jaxaudio.convert.peft import _KEY, _split_kernel, export_peft
from jaxaudio.layers.lora import LoraConfig, adapted_modules

TARGET_MODULES = ("query", "key", "value")  # the original's `target_modules`
_BIAS = re.compile(r"(?:base_model\.model\.)?(?P<module>.+?)(?:\.base_layer)?\.bias")


def lora_config(rank: int = 64, alpha: float = 128.0, dropout: float = 0.01) -> LoraConfig:
    """The original's LoRA (query/key/value of every layer) for a `Bert`, also nested
    (`bert/layers_0/...` in `AudioBert`)."""
    return LoraConfig(targets=bert.MODULE_NAMES.targets(TARGET_MODULES), rank=rank, alpha=float(alpha),
                      dropout=dropout)


def _adaptable(flat: dict[str, Any]) -> dict[str, str]:
    """`{our module name: full path prefix}` of every query/key/value kernel of the BERT in
    `flat`; with several candidate parents (an AST beside it), the one named `bert`."""
    pattern = re.compile(r"(?:(?P<parent>.*)/)?(?P<module>layers_\d+/attention/(?:query|key|value))/kernel")
    by_parent: dict[str, dict[str, str]] = {}
    for key in flat:
        m = pattern.fullmatch(key)
        if m:
            by_parent.setdefault(m["parent"] or "", {})[m["module"]] = key[: -len("/kernel")]
    if len(by_parent) > 1:
        named = [p for p in by_parent if p == "bert" or p.endswith("/bert")]
        if len(named) != 1:
            raise ConversionError(f"bert_params holds several BERT-like encoders ({sorted(by_parent)}); "
                                  "pass the BERT's parameters alone")
        return by_parent[named[0]]
    return next(iter(by_parent.values()), {})


def import_lora_pt(path: str, bert_params: Any, *, rank: int = 64, alpha: float = 128.0, dropout: float = 0.01,
                   allow_pickle: bool = False) -> tuple[Any, LoraConfig]:
    """`(params with lora_a/lora_b, LoraConfig)` from the original's `*_LORA.pt`.

    Args:
        path: the `.pt` file (`torch.load(weights_only=True)` unless `allow_pickle`).
        bert_params: the converted `Bert` parameters (`jaxaudio.convert.hf.convert_hf` of
            `bert-base-uncased`), alone or nested (`AudioBert`'s `params` with `bert/...`).
        rank: the LoRA rank the checkpoint must have (the original: 64).
        alpha, dropout: for the returned config (the file records neither; the original:
            128 and 0.01). Run the model inside `jaxaudio.layers.lora.lora(config)`.

    Every key must be a LoRA tensor (or PEFT < 0.7's copy of the base bias) of a
    query/key/value layer of `bert_params`, every such layer needs both tensors, at rank
    `rank`; otherwise `ConversionError` lists every problem and nothing is returned.
    """
    tensors = load_state_dict(path, allow_pickle=allow_pickle)
    flat = dict(flatten(bert_params))
    modules = _adaptable(flat)
    if not modules:
        raise ConversionError(f"{path}: bert_params holds no layers_N/attention/(query|key|value)/kernel; "
                              "pass the converted BERT's parameters")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    problems = []
    for key, value in sorted(tensors.items()):
        m = _KEY.fullmatch(key)
        if m is None:
            b = _BIAS.fullmatch(key)
            ours = bert.MODULE_NAMES.to_ours(b["module"]) if b else None
            if ours in modules:
                base = np.asarray(flat[f"{modules[ours]}/bias"], np.float32).reshape(-1)
                if value.shape != base.shape or not np.allclose(value, base, rtol=1e-5, atol=1e-6):
                    problems.append(f"{key}: the base bias saved with the adapters differs from bert_params' "
                                    f"{modules[ours]}/bias: the adapters were trained on another BERT")
                continue
            problems.append(f"{key}: not a LoRA tensor (lora_A/lora_B of query/key/value)")
            continue
        ours = bert.MODULE_NAMES.to_ours(m["module"])
        if ours is None or not ours.endswith(TARGET_MODULES):
            problems.append(f"{key}: not an adapter of a self-attention query/key/value layer")
            continue
        if ours not in modules:
            problems.append(f"{key}: the BERT has no module {ours!r} (its layers: {_layer_range(modules)})")
            continue
        pairs.setdefault(ours, {})[m["ab"]] = value
    for ours in sorted(modules, key=_layer_order):
        ab = pairs.get(ours, {})
        if not ab:
            problems.append(f"{ours}: no adapter in the file (the original adapts every query/key/value)")
            continue
        if set(ab) != {"A", "B"}:
            problems.append(f"{ours}: lora_{'B' if 'A' in ab else 'A'} is missing")
            continue
        a, b = ab["A"], ab["B"]
        kernel = flat[f"{modules[ours]}/kernel"]
        contract = _split_kernel(tuple(kernel.shape), a.shape[1], b.shape[0]) if a.ndim == b.ndim == 2 else None
        if a.ndim == b.ndim == 2 and a.shape[0] == b.shape[1] != rank and contract is not None:
            problems.append(f"{ours}: the adapters have rank {a.shape[0]}, not rank={rank}")
            continue
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank or contract is None:
            problems.append(f"{ours}: lora_A {a.shape} / lora_B {b.shape} do not fit kernel {tuple(kernel.shape)} "
                            f"at rank {rank}")
            continue
        prefix = modules[ours]
        flat[f"{prefix}/lora_a"] = np.asarray(a.T.reshape(tuple(kernel.shape[:contract]) + (rank,)), kernel.dtype)
        flat[f"{prefix}/lora_b"] = np.asarray(b.T.reshape((rank,) + tuple(kernel.shape[contract:])), kernel.dtype)
    if problems:
        shown = "\n    ".join(problems[:40])
        more = f"\n    ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        raise ConversionError(f"{path}: the LoRA weights do not fit the BERT ({len(problems)} problems):\n"
                              f"    {shown}{more}")
    return unflatten(flat), lora_config(rank, alpha, dropout)


def _layer_range(modules: dict[str, str]) -> str:
    layers = sorted({_layer_order(m)[0] for m in modules})
    return f"{layers[0]}-{layers[-1]}"


def _layer_order(module: str) -> tuple[int, str]:
    n, rest = module.split("/", 1)
    return int(n[len("layers_"):]), rest


def _bert_subtree(params: Any) -> Any:
    """The `Bert` parameters inside `params` (a variables dict, `AudioBert`'s params, or a
    `Bert`'s params); adapters elsewhere are refused rather than dropped."""
    tree = params
    for level in ("params", "bert"):
        if isinstance(tree, Mapping) and level in tree and "layers_0" not in tree:
            outside = adapted_modules({k: v for k, v in tree.items() if k != level})
            if outside:
                raise ConversionError(f"export: adapters outside the BERT ({outside[:5]}) have no PEFT name here")
            tree = tree[level]
    if not (isinstance(tree, Mapping) and "layers_0" in tree):
        raise ConversionError("export: found no BERT parameters (layers_0, ...) in params, params['bert'] or "
                              "params['params']['bert']")
    return tree


def export_peft_bert(out_dir: str, params: Any, config: LoraConfig, *, base_model: str | None = None) -> list[str]:
    """Write the BERT adapters of `params` as a PEFT adapter directory that
    `peft.PeftModel.from_pretrained(BertForMaskedLM.from_pretrained(base), out_dir)` loads
    (and `jaxaudio.convert.peft.import_peft(out_dir, params, bert.MODULE_NAMES)` reads back).

    `params`: a `Bert`'s parameters, `AudioBert`'s (`bert/...`) or a variables dict;
    `config`: its `LoraConfig` (rank, alpha and dropout are written). No task type, as the
    original's `get_peft_model`. Returns the tensor keys written.
    """
    tree = _bert_subtree(params)
    rank = {np.shape(v)[-1] for k, v in flatten(tree).items() if k.endswith("/lora_a")}
    if rank and rank != {config.rank}:
        raise ConversionError(f"export: the adapters have rank {sorted(rank)} but config.rank is {config.rank}")
    return export_peft(out_dir, tree, config, bert.MODULE_NAMES, base_model=base_model,
                       task_type=None)
