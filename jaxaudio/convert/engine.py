"""The shared conversion engine: a declarative key map applied with strict accounting.

A `KeyMap` lists `Rule`s (a regex over source keys -> a '/'-joined Flax variable path
template, plus a transform) and `Ignore`s (source keys dropped on purpose, each with the
reason, optionally checked against an expectation first). `convert` applies it to a flat
state dict and fails with one message that lists every unexpected source key, every
target left unfilled, every shape mismatch and every failed check — never a partial model.
"""
import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

Transform = Callable[[np.ndarray, tuple[int, ...]], np.ndarray]


class ConversionError(ValueError):
    """A checkpoint that does not fit the model; the message lists every problem."""


def identity(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return x.reshape(shape)


def linear(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """PyTorch Linear weight `[out, in]` -> Flax kernel `[in, out]`, reshaped to the target
    (`[embed, 3, heads, head_dim]` for a fused qkv, `[heads, head_dim, embed]` for an output)."""
    return x.T.reshape(shape)


def conv2d(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """PyTorch Conv2d weight `[out, in, kh, kw]` -> Flax `[kh, kw, in, out]`."""
    return x.transpose(2, 3, 1, 0).reshape(shape)


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str
    target: str
    transform: Transform = identity


@dataclasses.dataclass(frozen=True)
class Ignore:
    """Source keys dropped on purpose. `check(array) -> error message or None` runs first.

    `same_as`: the key is a tied copy of another source key (the first of these templates,
    expanded with the match's groups, that the checkpoint holds); it must be equal to it.
    """
    source: str
    reason: str
    check: Callable[[np.ndarray], str | None] | None = None
    same_as: Sequence[str] = ()


@dataclasses.dataclass(frozen=True)
class Merge:
    """Several source keys that make one tensor (e.g. weight norm's `weight_g` + `weight_v`).

    Keys matching `source` (a regex with a named group `part`) are grouped by
    `match.expand(into)`; when a group holds every one of `parts`, `fn({part: array})`
    becomes the key `into` names, which the rules then map. An incomplete group is an error.
    """
    source: str
    into: str
    parts: Sequence[str]
    fn: Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """`optional`: a regex of target paths this source does not have (e.g. the heads of a
    pretraining checkpoint); they are left out of the result and keep a fresh init."""
    rules: Sequence[Rule]
    ignore: Sequence[Ignore] = ()
    optional: str | None = None
    merge: Sequence[Merge] = ()


def flatten(tree: Mapping[str, Any], is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """Nested dict -> {'a/b/c': leaf}; `is_leaf` keeps some subtrees whole (e.g. a quantized kernel)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
        out["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


def _merge(state_dict: Mapping[str, np.ndarray], merges: Sequence[Merge]) -> tuple[dict[str, Any], list[str]]:
    """Apply the `Merge`s: their parts leave the dict and the merged tensors enter it."""
    out, failed = dict(state_dict), []
    for merge in merges:
        pattern, groups = re.compile(merge.source), {}
        for key in sorted(out):
            if m := pattern.fullmatch(key):
                groups.setdefault(m.expand(merge.into), {})[m["part"]] = out.pop(key)
        for into, parts in sorted(groups.items()):
            if set(parts) != set(merge.parts):
                failed.append(f"{into}: needs {sorted(merge.parts)}, the checkpoint has {sorted(parts)}")
                continue
            try:
                out[into] = merge.fn({p: np.asarray(a) for p, a in parts.items()})
            except ValueError as e:
                failed.append(f"{into}: {e}")
    return out, failed


def _check_ignored(rule: Ignore, key: str, value: np.ndarray, state_dict: Mapping[str, Any]) -> str | None:
    if rule.check is not None and (msg := rule.check(value)):
        return msg
    if rule.same_as:
        m = re.fullmatch(rule.source, key)
        names = [m.expand(t) for t in rule.same_as]
        other = next((n for n in names if n in state_dict), None)
        if other is None:
            return f"tied to {' or '.join(names)}, which the checkpoint does not hold"
        ref = np.asarray(state_dict[other])
        if ref.shape != value.shape or not np.array_equal(ref, value):
            return f"differs from {other}, to which it is tied (untied checkpoints are not supported)"
    return None


def _fmt(items: Sequence[str], limit: int = 40) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n    {shown}{more}"


def convert(state_dict: Mapping[str, np.ndarray], key_map: KeyMap, expected: Mapping[str, Any],
            dtype: Any = np.float32, source_name: str = "checkpoint") -> dict[str, Any]:
    """Map `state_dict` (flat, PyTorch names) onto the variable tree `expected`.

    `expected` is the model's variable tree (arrays or `ShapeDtypeStruct`s, e.g. from
    `jax.eval_shape(model.init, ...)`); the result has exactly its paths and shapes, with
    floating arrays cast to `dtype`. Raises `ConversionError` listing every problem.
    """
    want = {k: tuple(v.shape) for k, v in flatten(expected).items()}
    state_dict, failed = _merge(state_dict, key_map.merge)
    compiled = [(re.compile(r.source), r) for r in key_map.rules]
    ignored = [(re.compile(i.source), i) for i in key_map.ignore]
    out: dict[str, np.ndarray] = {}
    unexpected, mismatched, duplicate = [], [], []
    seen_targets: set[str] = set()
    for key in sorted(state_dict):
        value = np.asarray(state_dict[key])
        rule_hit = [(m, r) for pat, r in compiled if (m := pat.fullmatch(key))]
        ignore_hit = [i for pat, i in ignored if pat.fullmatch(key)]
        if ignore_hit:
            if msg := _check_ignored(ignore_hit[0], key, value, state_dict):
                failed.append(f"{key}: {msg}")
            continue
        if not rule_hit:
            unexpected.append(f"{key} {tuple(value.shape)}")
            continue
        match, rule = rule_hit[0]
        target = match.expand(rule.target)
        if target not in want:
            unexpected.append(f"{key} -> {target} (no such variable in the model)")
            continue
        if target in out:
            duplicate.append(f"{key} -> {target}")
            continue
        shape = want[target]
        seen_targets.add(target)
        try:
            converted = rule.transform(value, shape)
        except ValueError:
            converted = None
        if converted is None or converted.shape != shape:
            mismatched.append(f"{key} {tuple(value.shape)} -> {target} expects {shape}")
            continue
        if np.issubdtype(converted.dtype, np.floating):
            converted = converted.astype(dtype)
        out[target] = converted
    optional = re.compile(key_map.optional) if key_map.optional else None
    missing = [f"{k} {want[k]}" for k in sorted(want)
               if k not in seen_targets and not (optional and optional.fullmatch(k))]
    problems = []
    for title, items in (("unexpected keys (no rule maps them)", unexpected),
                         ("missing variables (no key fills them)", missing),
                         ("mis-shaped tensors", mismatched),
                         ("keys mapped twice", duplicate),
                         ("failed checks", failed)):
        if items:
            problems.append(f"  {len(items)} {title}:{_fmt(items)}")
    if problems:
        raise ConversionError(f"cannot convert {source_name}:\n" + "\n".join(problems))
    return unflatten(out)
