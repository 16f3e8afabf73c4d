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

The whole model (`convert_audiobert`, `launch/convert.py --model=audiobert`): a Hugging Face
`BertForMaskedLM` folder (bert-base-uncased) -> `params/bert`, an `ASTModel` /
`ASTForAudioClassification` folder (MIT/ast-finetuned-audioset-10-10-0.4593; its AudioSet
head is dropped: AudioBERT reads `last_hidden_state`) -> `params/ast`, both through
`convert_hf` and sized by their config.json, plus the `*_LORA.pt` adapters through
`import_lora_pt`. What the sources lack is declared in the config's `fresh` regex (the
trainer keeps those variables' initialisation): the adapters without a `*_LORA.pt`, and
`audio_proj` when AST's width differs from BERT's (the original's BERT-large `Linear`,
never saved). The original trains AST but saves only the adapters, so a `*_LORA.pt` here
sits on the pretrained AST, not on the AST it was trained with.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxaudio.convert import ast as ast_convert
from jaxaudio.convert import bert
from jaxaudio.convert.engine import ConversionError, flatten, unflatten
from jaxaudio.convert.hf import read_hf_config
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


# ---- the whole model: BERT + AST (+ the original's adapters) -> AudioBert ----------------------

ORIGINAL_LORA = {"rank": 64, "alpha": 128.0, "dropout": 0.01}  # the original's LoraConfig
# Variables a conversion may leave to the trainer (config.json's `fresh`, matched as
# "<collection>/<path>"): the adapters without a `*_LORA.pt`; the projection, never saved.
FRESH_ADAPTERS = r"params/bert/.*/lora_[ab]"
FRESH_PROJECTION = r"params/audio_proj/.*"
_AST_HEAD = ("params/ast/classifier/", "params/ast/classifier_layernorm/")


def build(kwargs: dict[str, Any]) -> tuple[Any, tuple]:
    """`AudioBert(**kwargs)` and example `init` arguments: 4 tokens, one span slot and one AST
    input of `max_length` x `num_mel_bins` (the variables depend on none of these lengths)."""
    import jax.numpy as jnp

    from jaxaudio.models.audiobert import AudioBert
    module = AudioBert(**kwargs)
    ast = module.parts()[1]
    return module, (jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                    jnp.zeros((1, 1, ast.max_length, ast.num_mel_bins), jnp.float32))


def _lora_kwargs(lora: Mapping[str, Any] | None) -> dict[str, Any] | None:
    from jaxaudio.models.audiobert import DEFAULT_LORA
    if lora is None:
        return None
    unknown = sorted(set(lora) - set(ORIGINAL_LORA))
    if unknown:
        raise ConversionError(f"lora={dict(lora)}: unknown keys {unknown}; give rank, alpha, dropout")
    merged = {**ORIGINAL_LORA, **lora}
    # The targets as configs/audiobert.py and the model's default: query/key/value of every BERT layer.
    return {**DEFAULT_LORA, "rank": int(merged["rank"]), "alpha": float(merged["alpha"]),
            "dropout": float(merged["dropout"])}


def _part_kwargs(hf: dict[str, Any], source: str, part: str) -> dict[str, Any]:
    """`Bert` kwargs (an MLM head required) or `AST` kwargs (no classifier) from a config.json."""
    mod, what = (bert, "a BERT (bert-base-uncased)") if part == "bert" else (
        ast_convert, "an AST (MIT/ast-finetuned-audioset-10-10-0.4593)")
    if hf.get("model_type") not in mod.HF_MODEL_TYPES:
        raise ConversionError(f"{source}: config.json has model_type={hf.get('model_type')!r}; AudioBERT's "
                              f"{'language model' if part == 'bert' else 'audio encoder'} is {what}")
    try:
        kwargs = mod.config_from_hf(hf)
    except ConversionError as e:
        raise ConversionError(f"{source}: {e}") from None
    if part == "bert" and kwargs["head"] != "mlm":
        arch = (hf.get("architectures") or ["BertModel"])[0]
        raise ConversionError(f"{source}: a {arch} checkpoint (config.json architectures) has no masked-LM head "
                              "(cls.predictions.*); AudioBERT is a BertForMaskedLM: give bert-base-uncased's folder "
                              "as BertForMaskedLM.save_pretrained writes it")
    if part == "ast":
        kwargs["num_labels"] = 0  # AudioBERT reads last_hidden_state; the AudioSet head is dropped
    return kwargs


def audiobert_kwargs(bert_hf: dict[str, Any], ast_hf: dict[str, Any], *,
                     lora: Mapping[str, Any] | None = ORIGINAL_LORA, injection: str = "double", gate: str = "span",
                     bert_source: str = "BERT config.json", ast_source: str = "AST config.json") -> dict[str, Any]:
    """`AudioBert` kwargs from the two config.json dicts (what `convert_audiobert` saves as
    `kwargs`): `bert` from BERT's (which must be a masked LM), `ast` from AST's without its
    classifier, `lora` the original's unless given (`None`: no adapters)."""
    return {"bert": _part_kwargs(bert_hf, bert_source, "bert"), "ast": _part_kwargs(ast_hf, ast_source, "ast"),
            "lora": _lora_kwargs(lora), "injection": injection, "gate": gate}


def _check_rank(path: str, rank: int, allow_pickle: bool) -> int:
    """The number of tensors in `path`; one line when every adapter there has one rank and
    it is not `rank` (other misfits: `import_lora_pt` lists them module by module)."""
    tensors = load_state_dict(path, allow_pickle=allow_pickle)
    ranks = {int(np.shape(v)[0]) for k, v in tensors.items() if ".lora_A." in k and np.ndim(v) == 2}
    if len(ranks) == 1 and ranks != {rank}:
        raise ConversionError(f"{path}: its adapters have rank {ranks.pop()}, but AudioBERT's LoRA here has rank "
                              f"{rank} (lora rank; the original's r=64, configs/audiobert.py's model.lora.rank)")
    return len(tensors)


def convert_audiobert(bert_dir: str, ast_dir: str, lora_pt: str | None = None, *,
                      lora: Mapping[str, Any] | None = ORIGINAL_LORA, injection: str = "double", gate: str = "span",
                      dtype: str = "float32", allow_pickle: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(variables, config)` of an `AudioBert` from its sources (see the module docstring).

    Args:
        bert_dir: a Hugging Face `BertForMaskedLM` folder (bert-base-uncased); a BERT without
            the MLM head (`BertModel`, the detector's `BertForTokenClassification`) is refused.
        ast_dir: an `ASTModel` / `ASTForAudioClassification` folder; the classifier is dropped.
        lora_pt: the original's `*_LORA.pt` (`import_lora_pt`), or None: the adapters start
            fresh in training (declared in `config["fresh"]`).
        lora: rank / alpha / dropout (the original's 64 / 128 / 0.01); the file must have that
            rank. None: a model without adapters (then no `lora_pt`).
        injection, gate: `AudioBert`'s (the released code: "double"; "span" gates LoRA and the
            injection on the presence of a span, "always" is the released code).
        dtype: the parameters' storage dtype.

    `config` = `{"model": "audiobert", "kwargs", "dtype", "source_tensors", "sources",
    "fresh" (when some variables are left to the trainer), "dropped"}`:
    `jaxaudio.convert.hf.load_pretrained` rebuilds the module from it and the trainer starts
    from it (`config.init.checkpoint`). Problems of all sources are raised together.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxaudio.convert.system import Pretrained, Problems, _convert_part, check_dtype
    from jaxaudio.models.audiobert import GATES, INJECTIONS

    check_dtype(dtype)
    if injection not in INJECTIONS:
        raise ConversionError(f"injection={injection!r}: choose one of {INJECTIONS}")
    if gate not in GATES:
        raise ConversionError(f"gate={gate!r}: choose one of {GATES}")
    if lora is None and lora_pt:
        raise ConversionError(f"{lora_pt}: LoRA weights were given, but lora=None (a model without adapters)")
    for role, path in (("the BERT folder", bert_dir), ("the AST folder", ast_dir), ("the LoRA file", lora_pt)):
        if path is not None and not os.path.exists(path):
            raise ConversionError(f"{path}: no such file or folder ({role})")

    problems = Problems()
    bert_hf, ast_hf = problems.attempt(read_hf_config, bert_dir), problems.attempt(read_hf_config, ast_dir)
    parts = {}
    if bert_hf is not None:
        parts["bert"] = problems.attempt(_part_kwargs, bert_hf, bert_dir, "bert")
    if ast_hf is not None:
        parts["ast"] = problems.attempt(_part_kwargs, ast_hf, ast_dir, "ast")
    lora_kw = _lora_kwargs(lora)
    lora_tensors = problems.attempt(_check_rank, lora_pt, lora_kw["rank"], allow_pickle) if lora_pt else 0
    _raise(problems)
    kwargs = {"bert": parts["bert"], "ast": parts["ast"], "lora": lora_kw, "injection": injection, "gate": gate}
    module, example = build(kwargs)
    try:
        expected = flatten(nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *example)))
    except ValueError as e:
        raise ConversionError(f"AudioBERT: the model cannot be built with these sizes: {e}") from None

    flat, tensors = {}, lora_tensors
    for part in (Pretrained(bert_dir, "bert", "bert"), Pretrained(ast_dir, "ast", "ast")):
        converted = problems.attempt(_convert_part, part, expected, allow_pickle)
        if converted is not None:
            flat.update(converted[0])
            tensors += converted[1]
    dropped = sorted(k for k in flat if k.startswith(_AST_HEAD))
    for k in dropped:
        del flat[k]
    if lora_pt and not problems.messages:
        tree = unflatten({k[len("params/"):]: v for k, v in flat.items()})
        with_adapters = problems.attempt(lambda: import_lora_pt(lora_pt, tree, rank=lora_kw["rank"],
                                                                alpha=lora_kw["alpha"], dropout=lora_kw["dropout"],
                                                                allow_pickle=allow_pickle)[0])
        if with_adapters is not None:
            flat = {f"params/{k}": v for k, v in flatten(with_adapters).items()}
    _raise(problems)

    fresh = []
    if lora_kw is not None and not lora_pt:
        fresh.append(FRESH_ADAPTERS)
    if any(k.startswith("params/audio_proj/") for k in expected):
        fresh.append(FRESH_PROJECTION)
    left = re.compile("|".join(fresh) or r"(?!)")
    want = {k: tuple(v.shape) for k, v in expected.items() if not left.fullmatch(k)}
    got = {k: tuple(np.shape(v)) for k, v in flat.items()}
    if got != want:  # each folder was checked against its part; this guards the assembly
        diff = sorted(set(want.items()) ^ set(got.items()))
        raise ConversionError(f"AudioBERT: the assembled variables differ from the model's: {diff[:20]}")
    if dtype != "float32":
        flat = {k: np.asarray(jnp.asarray(v, dtype)) if np.issubdtype(np.asarray(v).dtype, np.floating) else v
                for k, v in flat.items()}
    config = {"model": "audiobert", "kwargs": kwargs, "dtype": dtype, "source_tensors": tensors,
              "sources": {"bert": os.path.abspath(bert_dir), "ast": os.path.abspath(ast_dir),
                          "lora": os.path.abspath(lora_pt) if lora_pt else None},
              "dropped": dropped}
    if fresh:
        config["fresh"] = "|".join(fresh)
    return unflatten(flat), config


def _raise(problems) -> None:
    """One problem as it is (one line); several under one title."""
    if len(problems.messages) == 1:
        raise ConversionError(problems.messages[0])
    problems.raise_any("cannot convert AudioBERT")

