"""Config handling that the audio-language tasks (BAT, SALMONN) share."""
import os
from typing import Any, Mapping, Sequence

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def model_kwargs(model_cfg, parts: Mapping[str, type], scalars: Mapping[str, Any] = ()) -> dict[str, Any]:
    """`config.model` -> the system module's kwargs: one dict of module fields per part
    (`parts`: name -> module class; a part set to None stays None), `lora` (a dict or
    None), the `scalars` (name -> default) and the dtypes. Unknown fields are named."""
    cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    kw = {}
    for part, cls in parts.items():
        if part in cfg and cfg[part] is None:
            kw[part] = None
            continue
        fields = dict(cfg.get(part) or {})
        unknown = set(fields) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"config.model.{part}: unknown {cls.__name__} fields {sorted(unknown)}")
        kw[part] = fields
    kw["lora"] = dict(cfg["lora"]) if cfg.get("lora") else None
    for key, default in dict(scalars).items():
        kw[key] = type(default)(cfg.get(key, default))
    for key in ("dtype", "param_dtype"):
        if cfg.get(key, "float32") not in DTYPE_NAMES:
            raise ValueError(f"config.model.{key}={cfg[key]!r}: choose one of {DTYPE_NAMES}")
        kw[key] = cfg.get(key, "float32")
    unknown = set(cfg) - set(kw)
    if unknown:
        raise ValueError(f"config.model: unknown fields {sorted(unknown)}")
    return kw


def check_part_paths(init_cfg, parts: Sequence[str], hints: Mapping[str, str],
                     skip: Sequence[str] = ()) -> dict[str, str]:
    """`{part: path}` of the `config.init.<part>` that are set (an empty one: the part keeps
    its random initialisation); a path that does not exist is an error with the part's
    hint (formatted with `path`) on how to make it."""
    out = {}
    for part in parts:
        path = init_cfg.get(part, "") if part not in skip else ""
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"config.init.{part}={path} does not exist. {hints[part].format(path=path)}")
        if path:
            out[part] = path
    return out


def tokenizer_path(data_cfg) -> str:
    """`config.data.tokenizer`, or the one trained on the generated data (`<root>/tokenizer.json`)."""
    return data_cfg.tokenizer or os.path.join(data_cfg.root, "tokenizer.json")


def load_tokenizer(data_cfg, vocab_size: int, system: str):
    """The config's `TextTokenizer`, checked against the LLM's vocabulary; a missing one
    says how to get it."""
    from jaxaudio.data.tokenizer import TextTokenizer
    path = tokenizer_path(data_cfg)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no tokenizer at {path}: train a {system} stage on the generated data first (it writes one), or set "
            "config.data.tokenizer to the LLM's tokenizer (a tokenizer.json or a Hugging Face directory)")
    tokenizer = TextTokenizer(path, data_cfg.bos_token, data_cfg.eos_token, data_cfg.pad_token)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {path} has {tokenizer.vocab_size} tokens, more than "
                         f"config.model.llm.vocab_size={vocab_size}")
    return tokenizer
