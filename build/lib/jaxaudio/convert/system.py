"""Assembling a system model (BAT, SALMONN) from several source checkpoints.

A system's variables come from parts, each converted on its own:
  `Checkpoint`  a torch/safetensors file whose tensors a `KeyMap` maps onto the model
                variables that `want` selects (e.g. an encoder, or a projector plus the
                LLM's LoRA adapters);
  `Pretrained`  a Hugging Face directory converted by `convert_hf` (sized by its
                config.json) and placed under one sub-module (`params/llm/...`).
`convert_system` converts every part, gathers the `ConversionError`s of all of them into
one error (a user fixes every source at once, not one per run), checks the assembled
variables against the model's and casts them to the storage dtype.
"""
import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaudio.convert.engine import ConversionError, KeyMap, Rule, convert, flatten, linear, unflatten
from jaxaudio.convert.hf import DTYPES, convert_hf
from jaxaudio.convert.io import load_state_dict
from jaxaudio.convert.peft import ModuleNames


def lora_rules(names: ModuleNames, src: str, dst: str = "params/llm/") -> list[Rule]:
    """PEFT adapter keys under `src` (`<torch module>.lora_A[.default].weight` `[r, in]`,
    `lora_B` `[out, r]`) -> `{dst}<our module>/lora_a` `[*in, r]` / `lora_b` `[r, *out]`."""
    rules = []
    for ours, theirs in names.pairs:
        module = re.escape(theirs).replace(r"\{n\}", r"(\d+)")
        target = dst + ours.replace("{n}", r"\1")
        for ab in "AB":
            rules.append(Rule(src + module + rf"\.lora_{ab}(\.default)?\.weight", f"{target}/lora_{ab.lower()}",
                              linear))
    return rules


def under(key_map: KeyMap, part: str) -> KeyMap:
    """`key_map` with its targets moved into sub-module `part` (`params/x` -> `params/part/x`)."""
    def move(target: str) -> str:
        collection, rest = target.split("/", 1)
        return f"{collection}/{part}/{rest}"
    return dataclasses.replace(key_map, rules=[dataclasses.replace(r, target=move(r.target)) for r in key_map.rules])


def is_adapter(path: str, part: str = "llm") -> bool:
    """Whether a flat variable path is a LoRA tensor of sub-module `part`."""
    return path.startswith(f"params/{part}/") and path.rsplit("/", 1)[-1] in ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """`path`'s tensors through `key_map` onto the model variables whose flat path `want`
    accepts. `state_dict`: the file's tensors when the caller has read them already (to
    size the model); otherwise they are read here."""
    path: str
    key_map: KeyMap
    want: Callable[[str], bool]
    state_dict: Mapping[str, np.ndarray] | None = None


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A Hugging Face directory, `convert_hf(path, model)`, placed under sub-module `part`."""
    path: str
    model: str
    part: str


class Problems:
    """The `ConversionError`s of several sources, raised as one."""

    def __init__(self):
        self.messages: list[str] = []

    def attempt(self, fn: Callable, *args: Any) -> Any:
        """`fn(*args)`, or None after noting its `ConversionError`."""
        try:
            return fn(*args)
        except ConversionError as e:
            self.messages.append(str(e))
            return None

    def raise_any(self, title: str) -> None:
        if self.messages:
            raise ConversionError(f"{title}:\n" + "\n".join(self.messages))


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")


def _convert_part(part: Checkpoint | Pretrained, expected: Mapping[str, Any],
                  allow_pickle: bool) -> tuple[dict[str, Any], int]:
    """`(flat variables, source tensors)` of one part."""
    if isinstance(part, Pretrained):
        variables, config = convert_hf(part.path, part.model, allow_pickle=allow_pickle)
        moved = {}
        for path, value in flatten(variables).items():
            collection, rest = path.split("/", 1)
            moved[f"{collection}/{part.part}/{rest}"] = value
        return moved, config["source_tensors"]
    state_dict = part.state_dict
    if state_dict is None:
        state_dict = load_state_dict(part.path, allow_pickle=allow_pickle)
    want = unflatten({k: v for k, v in expected.items() if part.want(k)})
    return flatten(convert(state_dict, part.key_map, want, source_name=part.path)), len(state_dict)


def convert_system(name: str, module: nn.Module, example: tuple, parts: Sequence[Checkpoint | Pretrained], *,
                   dtype: str = "float32", allow_pickle: bool = False) -> tuple[dict[str, Any], int]:
    """Convert `parts` into the variables of `module` (`example`: its `init` arguments);
    returns `(variables, number of source tensors)`.

    Every part is converted even when another fails; the errors of all of them make one
    `ConversionError` titled `cannot convert {name}`. `dtype` is the storage dtype of the
    parameters; other collections (BatchNorm statistics) stay float32.
    """
    check_dtype(dtype)
    try:
        expected = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *example))
    except ValueError as e:  # a module refusing its sizes (e.g. widths that do not divide)
        raise ConversionError(f"{name}: the model cannot be built with these sizes: {e}") from None
    expected = flatten(expected)
    problems, flat, tensors = Problems(), {}, 0
    for part in parts:
        converted = problems.attempt(_convert_part, part, expected, allow_pickle)
        if converted is not None:
            flat.update(converted[0])
            tensors += converted[1]
    problems.raise_any(f"cannot convert {name}")

    want = {k: tuple(v.shape) for k, v in expected.items()}
    got = {k: tuple(np.shape(v)) for k, v in flat.items()}
    if got != want:  # each source was checked against its part; this guards the assembly
        diff = sorted(set(want.items()) ^ set(got.items()))
        raise ConversionError(f"{name}: the assembled variables differ from the model's: {diff[:20]}")
    if dtype != "float32":
        flat = {k: np.asarray(jnp.asarray(v, dtype)) if k.startswith("params/") and np.issubdtype(v.dtype, np.floating)
                else v for k, v in flat.items()}
    return unflatten(flat), tensors
