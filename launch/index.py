"""Build, extend and query an index of CLAP audio embeddings.

    # build from a manifest (jsonl with "audio") or a folder of audio files
    python -m launch.index build --config=configs/clap_tiny.py --workdir=workdir/clap_tiny \
        --manifest=data_cache/clap_tiny/eval.jsonl --index=workdir/clap_tiny/index
    python -m launch.index build --config=configs/clap.py --checkpoint=converted/clap_fused \
        --config.data.tokenizer=clap-htsat-fused --folder=freesound/ --index=indexes/freesound
    # add clips to it (same CLAP, same feature settings)
    python -m launch.index append --config=... --workdir=... --folder=more/ --index=...
    # query it by text or by audio: prints the clip paths and cosine scores
    python -m launch.index query --config=configs/clap_tiny.py --workdir=workdir/clap_tiny \
        --index=workdir/clap_tiny/index --text="a loud bell rings" --k=5
    python -m launch.index query ... --audio=clip.wav

The CLAP is a training run (`--workdir`) or a converted checkpoint (`--checkpoint`), with
its config for the tokenizer and feature settings, as for `launch.evaluate`. A build that
stops (preemption, Ctrl-C) continues where it stopped when run again with the same
arguments; the index records the CLAP's fingerprint and feature settings, and querying or
extending it with another CLAP is refused. Batches are split over all local devices.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from launch.common import parse_flags, setup_jax

_CONFIG = config_flags.DEFINE_config_file("config", None, "A CLAP config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A CLAP training run's workdir.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Or: a converted CLAP (launch.convert).")
_INDEX = flags.DEFINE_string("index", None, "The index folder.")
_MANIFEST = flags.DEFINE_string("manifest", None, "build/append: a jsonl manifest of clips (field 'audio').")
_FOLDER = flags.DEFINE_string("folder", None, "build/append: a folder of audio files (searched recursively).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Clips per forward (default config.train.eval_batch_size).")
_STRICT = flags.DEFINE_bool("strict", False, "build/append: stop at an unreadable or silent clip instead of "
                            "skipping it.")
_TEXT = flags.DEFINE_multi_string("text", None, "query: a text query (repeatable).")
_AUDIO = flags.DEFINE_multi_string("audio", None, "query: an audio file to find neighbours of (repeatable).")
_K = flags.DEFINE_integer("k", 5, "query: results per query.")
flags.mark_flags_as_required(["config", "index"])

COMMANDS = ("build", "append", "query")


class IndexUsageError(Exception):
    """A bad input, reported as one line."""


def _mesh():
    import jax

    from jaxaudio.train.mesh import make_mesh
    return make_mesh({"data": -1}, jax.local_devices())


def _embedder():
    from jaxaudio.infer.clap import ClapEmbedder
    return ClapEmbedder.from_config(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value, batch_size=_BATCH.value,
                                    mesh=_mesh())


def _clips():
    from jaxaudio.retrieval.build import clips_from_folder, clips_from_manifest
    if bool(_MANIFEST.value) == bool(_FOLDER.value):
        raise app.UsageError("build/append need exactly one of --manifest or --folder")
    return clips_from_manifest(_MANIFEST.value) if _MANIFEST.value else clips_from_folder(_FOLDER.value)


def build(append: bool) -> str:
    from jaxaudio.retrieval.build import append_clips, build_index
    clips = _clips()
    embedder = _embedder()
    kw = dict(sample_rate=embedder.settings.sample_rate, batch_size=embedder.batch_size, strict=_STRICT.value)
    if append:
        summary = append_clips(_INDEX.value, clips, embedder.embed_audio, header=embedder.header, **kw)
    else:
        summary = build_index(clips, embedder.embed_audio, _INDEX.value, header=embedder.header, **kw)
    return str(summary)


def query() -> str:
    from jaxaudio.data.audio import AudioError, load_audio
    from jaxaudio.retrieval.index import ClapIndex
    texts, audios = _TEXT.value or [], _AUDIO.value or []
    if not texts and not audios:
        raise app.UsageError("query needs --text or --audio")
    index = ClapIndex.load(_INDEX.value)
    embedder = _embedder()
    index.check_model(embedder.identity)
    queries, labels = [], []
    if texts:
        queries.append(embedder.embed_text(texts))
        labels += [f"text: {t}" for t in texts]
    if audios:
        try:
            waves = [load_audio(a, embedder.settings.sample_rate).mean(0) for a in audios]
        except AudioError as e:
            raise IndexUsageError(str(e)) from None
        queries.append(embedder.embed_audio(waves))
        labels += [f"audio: {a}" for a in audios]
    import numpy as np
    scores, indices = index.search(np.concatenate(queries), _K.value, mesh=embedder.mesh)
    lines = []
    for label, hits in zip(labels, index.results(indices, scores)):
        lines.append(label)
        for i, h in enumerate(hits):
            caption = h.get("caption")
            caption = caption[0] if isinstance(caption, list) and caption else caption
            lines.append(f"  {i + 1}. {h['score']:.4f}  {h['audio']}" + (f"  ({caption})" if caption else ""))
    return "\n".join(lines)


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: python -m launch.index {{{','.join(COMMANDS)}}} --config=... --index=... "
                             f"(got {' '.join(argv[1:]) or 'no command'})")
    if bool(_WORKDIR.value) == bool(_CHECKPOINT.value):
        raise app.UsageError("pass exactly one of --workdir or --checkpoint")
    setup_jax(False)
    from jaxaudio.data.audio import AudioError
    from jaxaudio.data.manifest import ManifestError
    from jaxaudio.infer import InferError
    from jaxaudio.retrieval.index import ClapIndexError
    try:
        print(query() if argv[1] == "query" else build(append=argv[1] == "append"))
    except (IndexUsageError, InferError, ClapIndexError, ManifestError, AudioError) as e:
        sys.stderr.write(f"launch.index: error: {str(e).splitlines()[0]}\n")
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
