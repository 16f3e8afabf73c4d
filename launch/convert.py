"""Convert an original PyTorch checkpoint into a jaxaudio checkpoint (orbax + config.json).

    python -m launch.convert --model=spatial_ast --source=SpatialAST/finetuned.pth \
        --config=configs/spatial_ast.py --output=converted/spatial_ast [--dtype=bfloat16] \
        [--allow_pickle] [--state_key=model]

    # Hugging Face checkpoints (whisper, bert, llama, ast): sizes from the source's config.json
    python -m launch.convert --source=path/to/save_pretrained_dir --output=converted/llama [--model=llama]
    # checkpoints that carry their config (BEATs: cfg + model + label_dict)
    python -m launch.convert --model=beats --source=BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt --output=converted/beats
    # an original LAION-CLAP checkpoint (sizes from --amodel; --enable_fusion must match the file)
    python -m launch.convert --model=clap_laion --source=630k-audioset-fusion-best.pt --enable_fusion \
        --output=converted/clap   # --amodel=HTSAT-base for the music_* checkpoints
    # BAT from its three parts: --source (or --bat) is BAT's model.pt; the LLM's sizes come from
    # its config.json, the rest are the original's
    python -m launch.convert --model=bat --source=BAT/model.pt --spatial_ast=SpatialAST/finetuned.pth \
        --llama=Llama-2-7b-hf --output=converted/bat
    # SALMONN from its four parts: --source (or --salmonn) is salmonn_v1.pth; Whisper, BEATs and
    # the LLM are sized by their config.json / cfg, the connector and LoRA by salmonn_v1.pth
    python -m launch.convert --model=salmonn --whisper=whisper-large-v2 \
        --beats=BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt --vicuna=vicuna-13b-v1.1 \
        --salmonn=salmonn_v1.pth --output=converted/salmonn   # --beats=none: speech only
    # AudioBERT: bert-base-uncased (a BertForMaskedLM folder) + the AST folder (its AudioSet head
    # is dropped) [+ the original's *_LORA.pt, rank 64; without it the adapters start fresh]
    # [+ the retrieval CLAP to OUTPUT/clap: a ClapModel folder, or a LAION .pt with --enable_fusion]
    python -m launch.convert --model=audiobert --bert=bert-base-uncased \
        --ast=ast-finetuned-audioset-10-10-0.4593 --lora=weights/audio-bert_42_LORA.pt \
        --clap=clap-htsat-fused --output=converted/audiobert

`--source` is a weights file, a directory holding one (safetensors, a sharded
`model.safetensors.index.json`, or a torch `.bin`/`.pth`), or a Hugging Face hub id
(`org/name`, downloaded when the machine is online). The model is built from
`config.model`; every source tensor must be mapped or ignored on purpose and every model
variable filled, otherwise nothing is written and the error lists every problem.
`.pth` files that hold pickled Python objects (an argparse `Namespace`, say) are refused
unless `--allow_pickle` is given, because unpickling runs arbitrary code.

The result loads with `jaxaudio.convert.load_converted(output)` and starts a run with
`--config.init.checkpoint=OUTPUT` (train) or `--checkpoint=OUTPUT` (evaluate).
"""
import dataclasses
import os
import re
import sys
from typing import Any, Callable

from absl import app, flags
from ml_collections import ConfigDict, config_flags

from jaxaudio.convert.hf import HF_MODELS, SELF_DESCRIBING
from launch.common import parse_flags, setup_jax


@dataclasses.dataclass(frozen=True)
class Converter:
    """How to convert one model: build it (and example `init` arguments) from
    `config.model`, and its key map (`jaxaudio.convert.<model>.key_map(model)`)."""
    build: Callable[[ConfigDict], tuple[Any, tuple]]
    key_map: Callable[[Any], Any]


def _spatial_ast(model_cfg: ConfigDict):
    import jax.numpy as jnp

    from jaxaudio.models.spatial_ast import SpatialAST
    from jaxaudio.tasks.spatial_ast import model_kwargs
    model = SpatialAST(**model_kwargs(model_cfg))
    # The variables do not depend on the clip length; this one gives exactly target_frames frames.
    samples = model.hop_length * (model.target_frames - 1)
    return model, (jnp.zeros((1, 2, samples), jnp.float32),)


def _spatial_ast_key_map(model):
    from jaxaudio.convert.spatial_ast import key_map
    return key_map(model)


def _audiomae_key_map(model):
    from jaxaudio.convert.spatial_ast import audiomae_key_map
    return audiomae_key_map(model)


# One line per convertible model.
CONVERTERS: dict[str, Converter] = {
    "spatial_ast": Converter(_spatial_ast, _spatial_ast_key_map),
    # AudioMAE's pretrained.pth -> a Spatial-AST whose stem, CLS tokens and heads start fresh.
    "spatial_ast_from_audiomae": Converter(_spatial_ast, _audiomae_key_map),
}

DTYPES = ("float32", "bfloat16")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file whose `model` section sizes the model "
                                          "(not needed for Hugging Face checkpoints).", lock_config=True)
_MODEL = flags.DEFINE_enum("model", None,
                           sorted(CONVERTERS) + sorted(HF_MODELS) + sorted(SELF_DESCRIBING)
                           + ["audiobert", "bat", "salmonn", "clap_laion"],
                           "Which model's key map (default: config.task, or config.json's model_type).")
_SOURCE = flags.DEFINE_string("source", None, "Weights file, directory, or Hugging Face hub id (org/name).")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the converted checkpoint.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", DTYPES, "Storage dtype of the parameters (statistics stay float32).")
_ALLOW_PICKLE = flags.DEFINE_bool("allow_pickle", False, "Fully unpickle .pth/.bin files (runs code: trusted files only).")
_STATE_KEY = flags.DEFINE_string("state_key", None, "Sub-dict of the checkpoint holding the tensors (e.g. model); "
                                 "default: a top-level 'model' or 'state_dict' entry if there is one.")
flags.mark_flag_as_required("output")
_SPATIAL_AST = flags.DEFINE_string("spatial_ast", None, "--model=bat: Spatial-AST finetuned.pth.")
_BAT = flags.DEFINE_string("bat", None, "--model=bat: BAT's model.pt (projector + LoRA), instead of --source.")
_SALMONN = flags.DEFINE_string("salmonn", None, "--model=salmonn: salmonn_v1.pth (Q-Former, projection, "
                               "LoRA), instead of --source.")
flags.register_multi_flags_validator(
    ["source", "bat", "salmonn", "model"],
    # --model=salmonn / audiobert name every missing path themselves (`salmonn_sources`, `run_audiobert`)
    lambda f: bool(f["source"] or (f["model"] == "bat" and f["bat"]) or f["model"] in ("salmonn", "audiobert")),
    "--source is required (for --model=bat: --bat, or --source)")
_ENABLE_FUSION = flags.DEFINE_bool("enable_fusion", False, "--model=clap_laion (and --clap=X.pt): the checkpoint is "
                                   "a fused one (*-fusion-best.pt); must match the file (LAION-AI/CLAP#113).")
_AMODEL = flags.DEFINE_enum("amodel", "HTSAT-tiny", ["HTSAT-tiny", "HTSAT-base"],
                            "--model=clap_laion: audio tower size.")
_LLAMA = flags.DEFINE_string("llama", None, "--model=bat: the Hugging Face LLaMA-2 directory.")
_WHISPER = flags.DEFINE_string("whisper", None, "--model=salmonn: the Hugging Face Whisper directory.")
_BEATS = flags.DEFINE_string("beats", None, "--model=salmonn: the BEATs checkpoint (.pt), or 'none' for a SALMONN "
                             "without BEATs.")
_VICUNA = flags.DEFINE_string("vicuna", None, "--model=salmonn: the Hugging Face Vicuna/LLaMA directory.")
_BERT = flags.DEFINE_string("bert", None, "--model=audiobert: the Hugging Face BertForMaskedLM directory.")
_AST = flags.DEFINE_string("ast", None, "--model=audiobert: the Hugging Face AST directory (ASTModel or "
                           "ASTForAudioClassification).")
_LORA = flags.DEFINE_string("lora", None, "--model=audiobert: the original's *_LORA.pt (rank 64); without it the "
                            "adapters start fresh in training.")
_CLAP = flags.DEFINE_string("clap", None, "--model=audiobert: also convert the retrieval CLAP (a Hugging Face "
                            "ClapModel directory, or a LAION .pt with --enable_fusion as the file) to OUTPUT/clap.")

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_HUB_PATTERNS = ["*.safetensors", "*.json", "*.bin", "*.pth", "*.pt", "*.ckpt"]


def looks_like_hub_id(source: str) -> bool:
    return bool(_HUB_ID.fullmatch(source)) and not os.path.exists(source)


def resolve_source(source: str) -> str:
    """A local path as it is; a hub id (`org/name`, not an existing path) downloaded to the HF cache."""
    from jaxaudio.convert import ConversionError
    if not looks_like_hub_id(source):
        return source
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConversionError(f"--source={source} looks like a Hugging Face hub id, but huggingface_hub is not "
                              "installed; pip install huggingface_hub, or pass a local file or directory") from None
    try:
        return snapshot_download(source, allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated repo, ...
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        raise ConversionError(
            f"--source={source} is not a local path, so it was taken as a Hugging Face hub id, and downloading it "
            f"failed ({reason}). Converting from the hub needs network access (and, for gated repositories, a "
            "token); offline, download the weights elsewhere and pass a local file or directory.") from None


def _save(output: str, variables: dict[str, Any], config: dict[str, Any], source: str,
          source_tensors: int, **extra: Any) -> dict[str, Any]:
    """Write the converted checkpoint and return the summary the command prints."""
    import jax
    import numpy as np

    from jaxaudio.convert import save_converted
    save_converted(output, variables, config)
    leaves = jax.tree.leaves(variables)
    return {
        **extra,
        "source": source,
        "source_tensors": source_tensors,
        "tensors": len(leaves),
        "parameters": sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"])),
        "collections": {k: len(jax.tree.leaves(v)) for k, v in variables.items()},
        "bytes": sum(a.nbytes for a in leaves),
        "output": os.path.abspath(output),
    }


def run(model_name: str, source: str, config: ConfigDict, output: str, dtype: str = "float32",
        allow_pickle: bool = False, state_key: str | None = None) -> dict[str, Any]:
    """Convert `source` for `model_name` and write it to `output`; returns a summary."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxaudio.convert import convert, load_state_dict

    if model_name not in CONVERTERS:
        raise app.UsageError(f"--model={model_name!r}: no converter; known: {sorted(CONVERTERS)}")
    if dtype not in DTYPES:
        raise app.UsageError(f"--dtype={dtype!r}: choose one of {DTYPES}")
    spec = CONVERTERS[model_name]
    path = resolve_source(source)
    state_dict = load_state_dict(path, allow_pickle=allow_pickle, state_key=state_key)
    model, example = spec.build(config.model)
    expected = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *example))
    key_map = spec.key_map(model)
    variables = convert(state_dict, key_map, expected, dtype=np.float32, source_name=path)
    if dtype == "bfloat16":  # parameters only: BatchNorm statistics keep float32
        variables["params"] = jax.tree.map(
            lambda a: a.astype(jnp.bfloat16) if np.issubdtype(a.dtype, np.floating) else a, variables["params"])

    model_config = config.model.to_dict()
    if "param_dtype" in model_config:
        model_config["param_dtype"] = dtype
    if key_map.optional:  # the trainer keeps these variables' fresh init (config.init.checkpoint)
        model_config["fresh"] = key_map.optional
    return _save(output, variables, model_config, path, len(state_dict))


def run_hf(source: str, output: str, model_name: str | None = None, dtype: str = "float32",
           allow_pickle: bool = False) -> dict[str, Any]:
    """Convert a Hugging Face checkpoint (sizes from its config.json), or an original one that
    carries its config (BEATs), and write it to `output`."""
    from jaxaudio.convert.hf import convert_pretrained
    path = resolve_source(source)
    variables, config = convert_pretrained(path, model_name, dtype=dtype, allow_pickle=allow_pickle)
    return _save(output, variables, config, path, config["source_tensors"], model=config["model"])


def run_bat(spatial_ast: str, bat: str, llama: str, output: str, dtype: str = "float32",
            allow_pickle: bool = False, **sizes: Any) -> dict[str, Any]:
    """Convert BAT's three checkpoints (`jaxaudio.convert.bat.convert_bat`; `sizes`: its
    `encoder`/`projector`/`lora` kwargs, the original's by default) and write them to
    `output`; `jaxaudio.convert.bat.load_bat(output)` reads the result back."""
    from jaxaudio.convert.bat import convert_bat
    variables, config = convert_bat(resolve_source(spatial_ast), resolve_source(bat), resolve_source(llama),
                                    allow_pickle=allow_pickle, dtype=dtype, **sizes)
    return _save(output, variables, config, ", ".join(config["sources"].values()), config["source_tensors"],
                 model="bat")


def run_salmonn(whisper: str, beats: str | None, vicuna: str, salmonn: str, output: str, dtype: str = "float32",
                allow_pickle: bool = False, **sizes: Any) -> dict[str, Any]:
    """Convert SALMONN's four checkpoints (`jaxaudio.convert.salmonn.convert_salmonn`; `beats`
    None: no BEATs; `sizes`: its `connector`/`lora`/`chunk_seconds`) and write them to
    `output`; `jaxaudio.convert.salmonn.load_salmonn(output)` reads the result back."""
    from jaxaudio.convert.salmonn import convert_salmonn
    variables, config = convert_salmonn(resolve_source(whisper), None if beats is None else resolve_source(beats),
                                        resolve_source(vicuna), resolve_source(salmonn), allow_pickle=allow_pickle,
                                        dtype=dtype, **sizes)
    return _save(output, variables, config, ", ".join(v for v in config["sources"].values() if v is not None),
                 config["source_tensors"], model="salmonn")


def run_clap_laion(source: str, output: str, enable_fusion: bool, amodel: str = "HTSAT-tiny", dtype: str = "float32",
                   allow_pickle: bool = False, **sizes: Any) -> dict[str, Any]:
    """Convert an original LAION-CLAP checkpoint (`jaxaudio.convert.clap.convert_laion`;
    `sizes`: its `audio`/`text`/`projection_dim` overrides) and write it to `output`;
    `jaxaudio.convert.hf.load_pretrained(output)` reads the result back."""
    from jaxaudio.convert.clap import convert_laion
    path = resolve_source(source)
    variables, config = convert_laion(path, enable_fusion=enable_fusion, amodel=amodel, dtype=dtype,
                                      allow_pickle=allow_pickle, **sizes)
    return _save(output, variables, config, path, config["source_tensors"], model="clap")


def run_audiobert(bert: str | None, ast: str | None, output: str, lora_pt: str | None = None,
                  clap: str | None = None, enable_fusion: bool = False, amodel: str = "HTSAT-tiny",
                  dtype: str = "float32", allow_pickle: bool = False, clap_sizes: dict[str, Any] | None = None,
                  **options: Any) -> dict[str, Any]:
    """Convert AudioBERT's BERT + AST (+ `lora_pt`) (`jaxaudio.convert.audiobert.convert_audiobert`;
    `options`: its `lora`/`injection`/`gate`) and write it to `output`; with `clap`, the
    retrieval CLAP too, to `output/clap` (a Hugging Face ClapModel folder through `run_hf`, a
    LAION `.pt` through `run_clap_laion` with `enable_fusion`/`amodel`/`clap_sizes`). Nothing
    is written unless both convert. `jaxaudio.convert.hf.load_pretrained` reads either back;
    the summary holds the CLAP's under "clap"."""
    from jaxaudio.convert import ConversionError
    from jaxaudio.convert.audiobert import convert_audiobert
    from jaxaudio.convert.hf import read_hf_config
    if not (bert and ast):
        raise app.UsageError("--model=audiobert needs --bert (a BertForMaskedLM folder) and --ast (an AST folder)")
    for flag, value in (("bert", bert), ("ast", ast), ("lora", lora_pt), ("clap", clap)):
        if value and not os.path.exists(value) and (flag == "lora" or not looks_like_hub_id(value)):
            raise ConversionError(f"--{flag}={value}: no such {'file' if flag == 'lora' else 'file or folder'}")
    clap_path = resolve_source(clap) if clap else None
    if clap_path and not os.path.isfile(clap_path):  # a Hugging Face folder: check it before writing anything
        hf = read_hf_config(clap_path)
        if hf.get("model_type") != "clap":
            raise ConversionError(f"--clap={clap}: config.json has model_type={hf.get('model_type')!r}; the retrieval "
                                  "CLAP is a ClapModel folder (laion/clap-htsat-fused) or a LAION .pt")
        if enable_fusion and not (hf.get("audio_config") or {}).get("enable_fusion", False):
            raise ConversionError(f"--clap={clap}: --enable_fusion was given, but this ClapModel is unfused "
                                  "(audio_config.enable_fusion is false in its config.json)")
    variables, config = convert_audiobert(resolve_source(bert), resolve_source(ast), lora_pt, dtype=dtype,
                                          allow_pickle=allow_pickle, **options)
    clap_summary = None
    if clap_path:
        clap_out = os.path.join(output, "clap")
        if os.path.isfile(clap_path):  # an original LAION checkpoint
            clap_summary = run_clap_laion(clap_path, clap_out, enable_fusion, amodel, dtype, allow_pickle,
                                          **(clap_sizes or {}))
        else:
            clap_summary = run_hf(clap_path, clap_out, "clap", dtype, allow_pickle)
    summary = _save(output, variables, config, ", ".join(v for v in config["sources"].values() if v),
                    config["source_tensors"], model="audiobert", fresh=config.get("fresh"))
    if clap_summary is not None:
        summary["clap"] = clap_summary
    return summary


def salmonn_sources(whisper: str | None, beats: str | None, vicuna: str | None,
                    salmonn: str | None) -> tuple[str, str | None, str, str]:
    """The four `--model=salmonn` paths (`--beats=none`: no BEATs); a missing one is a usage error."""
    missing = [f"--{name}" for name, value in (("whisper", whisper), ("beats", beats), ("vicuna", vicuna),
                                               ("salmonn", salmonn)) if not value]
    if missing:
        raise app.UsageError(f"--model=salmonn needs {', '.join(missing)} (--salmonn may be given as --source; "
                             "--beats=none converts a SALMONN without BEATs)")
    return whisper, None if beats.lower() == "none" else beats, vicuna, salmonn


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_jax(False)
    from jaxaudio.convert import ConversionError
    config = _CONFIG.value
    model_name = _MODEL.value or (config.get("task") if config is not None else None)
    try:
        if model_name == "bat":
            if not (_SPATIAL_AST.value and _LLAMA.value):
                raise app.UsageError("--model=bat needs --spatial_ast and --llama (and --bat or --source)")
            s = run_bat(_SPATIAL_AST.value, _BAT.value or _SOURCE.value, _LLAMA.value, _OUTPUT.value, _DTYPE.value,
                        _ALLOW_PICKLE.value)
        elif model_name == "salmonn":
            paths = salmonn_sources(_WHISPER.value, _BEATS.value, _VICUNA.value, _SALMONN.value or _SOURCE.value)
            s = run_salmonn(*paths, _OUTPUT.value, _DTYPE.value, _ALLOW_PICKLE.value)
        elif model_name == "audiobert":
            s = run_audiobert(_BERT.value, _AST.value, _OUTPUT.value, _LORA.value, _CLAP.value, _ENABLE_FUSION.value,
                              _AMODEL.value, _DTYPE.value, _ALLOW_PICKLE.value)
        elif model_name == "clap_laion":
            s = run_clap_laion(_SOURCE.value, _OUTPUT.value, _ENABLE_FUSION.value, _AMODEL.value, _DTYPE.value,
                               _ALLOW_PICKLE.value)
        elif model_name is None or model_name in HF_MODELS or model_name in SELF_DESCRIBING:
            s = run_hf(_SOURCE.value, _OUTPUT.value, model_name, _DTYPE.value, _ALLOW_PICKLE.value)
            model_name = s["model"]
        else:
            if config is None:
                raise app.UsageError(f"--model={model_name} needs --config (its sizes come from config.model)")
            s = run(model_name, _SOURCE.value, config, _OUTPUT.value, _DTYPE.value, _ALLOW_PICKLE.value,
                    _STATE_KEY.value)
    except ConversionError as e:
        print(f"convert: {e}", file=sys.stderr)
        sys.exit(1)
    _print_summary(model_name, s, _DTYPE.value)
    if s.get("clap"):
        _print_summary("clap", s["clap"], _DTYPE.value)


def _print_summary(model_name: str, s: dict[str, Any], dtype: str) -> None:
    collections = ", ".join(f"{k} {n}" for k, n in s["collections"].items())
    fresh = f"\n  left to the trainer's init (config.json fresh): {s['fresh']}" if s.get("fresh") else ""
    print(f"converted {model_name} from {s['source']} ({s['source_tensors']} source tensors)\n"
          f"  {s['tensors']} tensors ({collections}), {s['parameters']:,} parameters ({dtype}), "
          f"{s['bytes'] / 2**20:.1f} MiB{fresh}\n"
          f"  wrote {s['output']}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
