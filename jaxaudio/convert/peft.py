"""LoRA adapters in the PEFT format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names an adapter by the PyTorch module it wraps
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, `[r, in]`; `lora_B`
`[out, r]`); ours live beside the kernel (`layers_0/attn/query/lora_a` `[*in, r]`,
`lora_b` `[r, *out]`). `ModuleNames` translates module names both ways; each model's
converter defines one for its adaptable layers (e.g. `jaxaudio.convert.llama.MODULE_NAMES`).
SALMONN's checkpoint spells the same tensors `...q_proj.lora_A.default.weight`; both read.
"""
import dataclasses
import json
import os
import re
from typing import Any, Sequence

import numpy as np

from jaxaudio.convert.engine import ConversionError, flatten, unflatten
from jaxaudio.layers.lora import LoraConfig, adapted_modules
from jaxaudio.layers.scan import LayoutError, restack, scanned_stacks, unstack

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight")


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{n\})", template)
    return re.compile("".join(r"(?P<n>\d+)" if p == "{n}" else re.escape(p) for p in parts))


@dataclasses.dataclass(frozen=True)
class ModuleNames:
    """Pairs `(ours, torch)` of module-name templates; `{n}` stands for a layer index:
    `("layers_{n}/attn/query", "model.layers.{n}.self_attn.q_proj")`."""
    pairs: Sequence[tuple[str, str]]

    def _translate(self, name: str, src: int) -> str | None:
        for pair in self.pairs:
            m = _template_regex(pair[src]).fullmatch(name)
            if m:
                return pair[1 - src].replace("{n}", m.groupdict().get("n") or "")
        return None

    def to_torch(self, ours: str) -> str | None:
        return self._translate(ours, 0)

    def to_ours(self, torch_name: str) -> str | None:
        return self._translate(torch_name, 1)

    def targets(self, torch_leaf_names: Sequence[str]) -> str:
        """Our LoRA targets regex for PEFT `target_modules` (leaf names like `q_proj`)."""
        ours = [re.escape(o).replace(r"\{n\}", r"\d+") for o, t in self.pairs
                if t.rsplit(".", 1)[-1] in set(torch_leaf_names)]
        if not ours:
            raise ConversionError(f"target_modules {list(torch_leaf_names)} name no adaptable module of this model; "
                                  f"known: {sorted({t.rsplit('.', 1)[-1] for _, t in self.pairs})}")
        return f"(.*/)?({'|'.join(ours)})"


def export_peft(out_dir: str, params: Any, config: LoraConfig, names: ModuleNames, *,
                base_model: str | None = None, task_type: str = "CAUSAL_LM") -> list[str]:
    """Write the adapters found in `params` as a PEFT adapter directory; returns the keys."""
    from safetensors.numpy import save_file
    flat = unstack(flatten(params))  # PEFT names layers one by one
    tensors, leaves = {}, set()
    modules = adapted_modules(unflatten(flat))
    if not modules:
        raise ConversionError("export_peft: the parameters hold no lora_a/lora_b (init them inside `lora(config)`)")
    for module in modules:
        torch_name = names.to_torch(module)
        if torch_name is None:
            raise ConversionError(f"export_peft: no PyTorch name for module {module!r}; ModuleNames knows "
                                  f"{[o for o, _ in names.pairs]}")
        a, b = np.asarray(flat[f"{module}/lora_a"], np.float32), np.asarray(flat[f"{module}/lora_b"], np.float32)
        rank = a.shape[-1]
        tensors[f"base_model.model.{torch_name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, rank).T)
        tensors[f"base_model.model.{torch_name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, -1).T)
        leaves.add(torch_name.rsplit(".", 1)[-1])
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": sorted(leaves), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
    }
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(peft_config, f, indent=2, sort_keys=True)
    return sorted(tensors)


def _read_adapter(adapter_dir: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from jaxaudio.convert.io import load_state_dict
    path = os.path.join(adapter_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise ConversionError(f"{adapter_dir}: no {CONFIG_FILE}; a PEFT adapter directory has one")
    with open(path) as f:
        peft_config = json.load(f)
    for name in (WEIGHTS_FILE, "adapter_model.bin"):
        if os.path.exists(os.path.join(adapter_dir, name)):
            return peft_config, load_state_dict(os.path.join(adapter_dir, name))
    raise ConversionError(f"{adapter_dir}: no {WEIGHTS_FILE} or adapter_model.bin")


def lora_config_from_peft(peft_config: dict[str, Any], names: ModuleNames, source: str = CONFIG_FILE) -> LoraConfig:
    if peft_config.get("peft_type") != "LORA":
        raise ConversionError(f"{source}: peft_type={peft_config.get('peft_type')!r}; only LORA adapters are supported")
    for field, ok in (("use_rslora", False), ("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if peft_config.get(field, ok) not in (ok, None):
            raise ConversionError(f"{source}: {field}={peft_config[field]!r} is not supported (expected {ok!r})")
    if peft_config.get("modules_to_save"):
        raise ConversionError(f"{source}: modules_to_save={peft_config['modules_to_save']} is not supported")
    targets = peft_config.get("target_modules") or []
    if isinstance(targets, str):  # PEFT also allows a regex; ours is over different names
        raise ConversionError(f"{source}: target_modules is a regex ({targets!r}); give the module names as a list")
    return LoraConfig(targets=names.targets(targets), rank=int(peft_config["r"]),
                      alpha=float(peft_config["lora_alpha"]), dropout=float(peft_config.get("lora_dropout") or 0.0))


def _split_kernel(kernel_shape: tuple[int, ...], n_in: int, n_out: int) -> int | None:
    """How many leading kernel axes are inputs, given the flat in/out sizes of the adapter."""
    for contract in range(1, len(kernel_shape)):
        if (int(np.prod(kernel_shape[:contract])) == n_in and int(np.prod(kernel_shape[contract:])) == n_out):
            return contract
    return None


def import_peft(adapter_dir: str, params: Any, names: ModuleNames) -> tuple[Any, LoraConfig]:
    """`(params with the adapters set, LoraConfig)` from a PEFT adapter directory.

    `params` holds the base model (with or without adapters); every adapter tensor must name
    a module of it with matching sizes, otherwise nothing is returned and the error lists
    every problem.
    """
    peft_config, tensors = _read_adapter(adapter_dir)
    config = lora_config_from_peft(peft_config, names, os.path.join(adapter_dir, CONFIG_FILE))
    flat = dict(flatten(params))
    stacks = scanned_stacks(flat)
    flat = unstack(flat)  # PEFT names layers one by one; a scanned model gets its stacks back below
    pairs: dict[str, dict[str, np.ndarray]] = {}
    problems = []
    for key, value in sorted(tensors.items()):
        m = _KEY.fullmatch(key)
        ours = names.to_ours(m["module"]) if m else None
        if ours is None:
            problems.append(f"{key}: not a LoRA tensor of a known module")
            continue
        # `params` may hold the model under a parent (e.g. `llm/layers_0/...`).
        prefix = next((k[: -len("/kernel")] for k in flat
                       if k == f"{ours}/kernel" or k.endswith(f"/{ours}/kernel")), None)
        if prefix is None:
            problems.append(f"{key}: the model has no module {ours!r}")
            continue
        pairs.setdefault(prefix, {})[m["ab"]] = value
    for prefix, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            problems.append(f"{prefix}: lora_{'B' if 'A' in ab else 'A'} is missing")
            continue
        a, b, kernel = ab["A"], ab["B"], flat[f"{prefix}/kernel"]
        rank = config.rank
        contract = _split_kernel(tuple(kernel.shape), a.shape[1], b.shape[0])
        if a.shape[0] != rank or b.shape[1] != rank or contract is None:
            problems.append(f"{prefix}: lora_A {a.shape} / lora_B {b.shape} do not fit kernel {tuple(kernel.shape)} "
                            f"with r={rank}")
            continue
        dtype = kernel.dtype
        flat[f"{prefix}/lora_a"] = np.asarray(a.T.reshape(tuple(kernel.shape[:contract]) + (rank,)), dtype)
        flat[f"{prefix}/lora_b"] = np.asarray(b.T.reshape((rank,) + tuple(kernel.shape[contract:])), dtype)
    if not pairs and not problems:
        problems.append("no adapter tensors found")
    if problems:
        shown = "\n    ".join(problems[:40])
        raise ConversionError(f"{adapter_dir}: the adapter does not fit the model:\n    {shown}")
    # `target_modules` may cover more layers than hold adapters (PEFT's layers_to_transform):
    # then target exactly the adapted modules.
    pattern = re.compile(config.targets)
    targeted = {k[: -len("/kernel")] for k in flat if k.endswith("/kernel") and pattern.fullmatch(k[: -len("/kernel")])}
    if targeted != set(pairs):
        config = dataclasses.replace(config, targets="|".join(re.escape(p) for p in sorted(pairs)))
    try:
        restacked = restack(flat, stacks, strict=True)
    except LayoutError as e:
        raise ConversionError(f"{adapter_dir}: {e}; this model runs those layers under nn.scan (all adapted "
                              "alike): load the adapter into a model with scan_layers=False") from None
    return unflatten(restacked), config
