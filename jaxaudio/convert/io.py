"""Reading source checkpoints and writing converted ones.

Safetensors are read without torch. `.bin`/`.pth`/`.pt` files go through
`torch.load(weights_only=True)`; a file that needs full unpickling (it holds an argparse
`Namespace`, say) is refused unless the caller passes `allow_pickle=True`, because
unpickling runs arbitrary code.
"""
import json
import os
from typing import Any, Mapping

import numpy as np

from jaxaudio.convert.engine import ConversionError

TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _import_torch():
    """torch, or an error saying how to get it: it is not a runtime requirement (only
    `.bin`/`.pth`/`.pt` sources need it; safetensors do not)."""
    try:
        import torch
    except ImportError:
        raise ConversionError("reading a PyTorch checkpoint (.bin/.pth/.pt/.ckpt) needs torch, which "
                              "requirements.txt leaves out: pip install torch (the CPU build is enough), "
                              "or convert from a .safetensors file") from None
    return torch


def _torch_to_numpy(t) -> np.ndarray:
    torch = _import_torch()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.detach().cpu().numpy()


def _flatten_tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts of tensors (as some .pth files hold) -> flat 'a.b' keys."""
    out = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten_tensors(v, key + "."))
        else:
            out[key] = v
    return out


def _load_torch(path: str, allow_pickle: bool) -> Any:
    import pickle

    torch = _import_torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            raise ConversionError(
                f"{path} holds pickled Python objects besides tensors ({str(e).splitlines()[0]}); "
                "loading it would run arbitrary code. If you trust the file, pass --allow_pickle "
                "(allow_pickle=True).") from None
    return torch.load(path, map_location="cpu", weights_only=False)  # explicitly allowed


def _load_file(path: str, allow_pickle: bool) -> dict[str, Any]:
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return dict(load_file(path))
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out = {}
        for shard in shards:
            out.update(_load_file(os.path.join(os.path.dirname(path), shard), allow_pickle))
        return out
    if path.endswith(TORCH_SUFFIXES):
        return _load_torch(path, allow_pickle)
    raise ConversionError(f"{path}: unknown checkpoint format (expected .safetensors, "
                          f"an index .json, or one of {TORCH_SUFFIXES})")


def find_weights(path: str) -> str:
    """A weights file, or the one weights file of a directory."""
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        return path
    for name in WEIGHT_NAMES:
        if os.path.exists(os.path.join(path, name)):
            return os.path.join(path, name)
    found = sorted(f for f in os.listdir(path) if f.endswith((".safetensors",) + TORCH_SUFFIXES))
    if len(found) == 1:
        return os.path.join(path, found[0])
    raise ConversionError(f"{path}: no weights file found (looked for {', '.join(WEIGHT_NAMES)} or a single "
                          f".safetensors/.bin/.pth file; found {found or 'none'})")


def load_checkpoint(path: str, *, allow_pickle: bool = False) -> tuple[str, Any]:
    """`(file, object)`: the weights file of `path` and what it holds, read once (safetensors
    without torch; torch files with `weights_only=True` unless `allow_pickle`)."""
    file = find_weights(path)
    return file, _load_file(file, allow_pickle)


def tensors_of(obj: Mapping[str, Any], file: str, state_key: str | None = None) -> dict[str, np.ndarray]:
    """The flat `{name: ndarray}` state dict inside a loaded checkpoint object.

    `state_key` picks a sub-dict of a training checkpoint (`ckpt['model']`); with None, a
    top-level `model` or `state_dict` entry holding the tensors is taken automatically.
    """
    if state_key is not None:
        if state_key not in obj:
            raise ConversionError(f"{file}: has no entry {state_key!r} (top-level keys: {sorted(obj)[:20]})")
        obj = obj[state_key]
    else:
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    flat = _flatten_tensors(obj)
    out = {}
    for k, v in flat.items():
        if hasattr(v, "detach"):
            v = _torch_to_numpy(v)
        if not isinstance(v, np.ndarray):
            raise ConversionError(f"{file}: entry {k!r} is a {type(v).__name__}, not a tensor; "
                                  "pass state_key to pick the tensors' sub-dict")
        out[k] = v
    if not out:
        raise ConversionError(f"{file}: holds no tensors")
    return out


def load_state_dict(path: str, *, allow_pickle: bool = False, state_key: str | None = None) -> dict[str, np.ndarray]:
    """Load a flat `{name: float32/int ndarray}` state dict from a file or directory
    (`state_key` as in `tensors_of`)."""
    file, obj = load_checkpoint(path, allow_pickle=allow_pickle)
    return tensors_of(obj, file, state_key)


def save_converted(out_dir: str, variables: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Write `variables` as an orbax checkpoint at `out_dir/variables` and `config` as json."""
    import orbax.checkpoint as ocp
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(out_dir, "variables"), dict(variables), force=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)


def read_config_json(directory: str, missing: str) -> dict[str, Any]:
    """`directory/config.json`; `missing` is the error's text when there is none."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise ConversionError(missing)
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def read_converted_config(out_dir: str) -> dict[str, Any]:
    """The `config.json` that `save_converted` wrote in `out_dir` (without reading the variables)."""
    return read_config_json(os.path.abspath(out_dir), f"{out_dir}: not a converted checkpoint (no config.json; "
                                                      "python -m launch.convert writes one)")


def load_converted(out_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read back `(variables, config)` written by `save_converted`."""
    import orbax.checkpoint as ocp
    out_dir = os.path.abspath(out_dir)
    config = read_converted_config(out_dir)
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(os.path.join(out_dir, "variables"))
    return variables, config
