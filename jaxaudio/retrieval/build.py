"""Building a CLAP index from audio files, resumably, and appending to one.

`build_index(clips, embed_fn, directory, header=..., sample_rate=...)` reads every clip's
"audio" with `load_audio` at `sample_rate` (mono: the channel mean), embeds the clips in
batches with `embed_fn` and writes a `ClapIndex` to `directory`:

- A file at another rate is resampled; that is said once per rate per build (not per
  file) and counted in the summary.
- A clip that cannot be used (unreadable, empty, NaN, silent) is skipped with a one-line
  warning naming the file and listed in the summary; with `strict=True` the build stops
  there instead, naming the file.
- Progress: a tqdm bar in clips (tqdm shows clips/s).
- Resumable: every finished batch is written at once (fsync + rename) to
  `<directory>.partial/batch_NNNNNN.safetensors` (its embeddings, the clip positions it
  covered and those it skipped). Started again with the same clips and header, a build
  skips what is done; another header is refused, naming the fields that differ
  (`resume=False` starts over). At the end the index is saved (atomically) and the
  partial folder removed.
- With a mesh the batch handed to `embed_fn` is padded to one fixed size, `batch_size`
  rounded up to a multiple of the mesh's data-parallel size (axes "data" x "fsdp"; all
  devices for a mesh without them), by repeating the last clip; the padded rows of the
  result are dropped. One shape means one compile of a jitted `embed_fn`.

`embed_fn(waves: list[np.ndarray]) -> [len(waves), dim]`: each wave 1-D float32 at
`sample_rate`; the rows must be L2-normalised (within 1e-3; they are renormalised
exactly, anything further off stops the build).

`append_clips(directory, clips, embed_fn, header=...)` embeds clips the same way (same
resumable partial folder) and appends them to the index there; the header must equal
the index's.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import soundfile as sf

from jaxaudio.data.audio import AudioError, load_audio
from jaxaudio.data.manifest import read_manifest, write_json_atomic
from jaxaudio.retrieval.index import (
    NORM_TOLERANCE, ClapIndex, ClapIndexError, _fsync_dir, build_identity, header_difference)

_LOG = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
# A clip whose peak amplitude is below this (-120 dBFS) is treated as silent.
SILENCE_PEAK = 1e-6
PARTIAL_SUFFIX = ".partial"
STATE_FILE = "state.json"
EmbedFn = Callable[[list[np.ndarray]], np.ndarray]


class BuildError(ClapIndexError):
    """A build that cannot go on; the message names the clip or the setting at fault.
    (A `ClapIndexError`, so callers can catch every index problem with one class.)"""


@dataclasses.dataclass
class BuildSummary:
    """What a build or an append did.

    Attributes:
        index: the index as saved.
        added: clips embedded into it by this call (including ones reused from an
            interrupted run).
        reused: of those, clips whose batches an interrupted run had already finished.
        skipped: `(path, reason)` of every clip left out.
        resampled: file sample rate -> number of clips resampled from it.
        seconds: wall time of this call.
    """
    index: ClapIndex
    added: int
    reused: int
    skipped: list[tuple[str, str]]
    resampled: dict[int, int]
    seconds: float

    def __str__(self) -> str:
        text = (f"index {self.index.directory}: {len(self.index)} clips (+{self.added} now"
                f"{f', {self.reused} from an interrupted run' if self.reused else ''}), "
                f"{len(self.skipped)} skipped, {self.seconds:.1f} s"
                f" ({self.added / max(self.seconds, 1e-9):.1f} clips/s)")
        if self.resampled:
            text += "; resampled " + ", ".join(
                f"{n} from {r} Hz" for r, n in sorted(self.resampled.items()))
        return "\n".join([text] + [f"  skipped {_skip_text(p, r)}" for p, r in self.skipped])


# -- clip lists --------------------------------------------------------------------------


def clips_from_manifest(path: str | os.PathLike) -> list[dict]:
    """Records of a jsonl manifest (each needs "audio"; relative paths are resolved against
    the manifest's folder); every other field is kept in the index's records."""
    return read_manifest(path, required=("audio",))


def clips_from_folder(folder: str | os.PathLike,
                      extensions: Sequence[str] = AUDIO_EXTENSIONS) -> list[dict]:
    """`{"audio": absolute path}` for every file under `folder` (recursively) whose
    extension is in `extensions` (case-insensitive), sorted by path."""
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise BuildError(f"no audio folder {folder}: no such folder")
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        paths.extend(os.path.join(root, f) for f in files if f.lower().endswith(exts))
    return [{"audio": p} for p in sorted(paths)]


# -- helpers -----------------------------------------------------------------------------


def _data_parallel_size(mesh) -> int:
    if mesh is None:
        return 1
    axes = [a for a in ("data", "fsdp") if a in mesh.shape]
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else int(mesh.devices.size)


def _clips_digest(clips: Sequence[Mapping]) -> str:
    return hashlib.sha256(json.dumps([c["audio"] for c in clips]).encode()).hexdigest()


def _check_clips(clips: Sequence[Mapping]) -> list[dict]:
    out = []
    for i, c in enumerate(clips):
        if not isinstance(c, Mapping) or not isinstance(c.get("audio"), str) or not c["audio"]:
            raise BuildError(f"clip {i} has no 'audio' path: {c!r}")
        out.append(dict(c))
    return out


def _resolve_sample_rate(header: Mapping[str, Any], sample_rate: int | None) -> int:
    known = header.get("sample_rate")
    if known is None and isinstance(header.get("features"), Mapping):
        known = header["features"].get("sample_rate")
    if sample_rate is None:
        if known is None:
            raise BuildError("no sample_rate: pass sample_rate= or put it in the header's "
                             "features")
        return int(known)
    if known is not None and int(known) != int(sample_rate):
        raise BuildError(f"sample_rate={sample_rate} but the header says {known}")
    return int(sample_rate)


def _with_rate(header: Mapping[str, Any], sample_rate: int) -> dict:
    return {**header, "sample_rate": int(sample_rate)}


class _DropResampleLog(logging.Filter):
    """Silences load_audio's own resampling line while a build says it once itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("resampling audio")


@contextlib.contextmanager
def _build_logging(progress: bool):
    audio_log = logging.getLogger("jaxaudio.data.audio")
    filt = _DropResampleLog()
    audio_log.addFilter(filt)
    try:
        if progress:
            from tqdm.contrib.logging import logging_redirect_tqdm
            with logging_redirect_tqdm():
                yield
        else:
            yield
    finally:
        audio_log.removeFilter(filt)


def _read_clip(path: str, sample_rate: int):
    """(mono wave, file rate) or (None, AudioError)."""
    try:
        rate = sf.info(path).samplerate
    except Exception:  # noqa: BLE001 - load_audio gives the proper error below
        rate = None
    try:
        x = load_audio(path, sample_rate)
    except AudioError as e:
        return None, e
    return x.mean(axis=0).astype(np.float32), rate


# -- the partial folder ------------------------------------------------------------------


@dataclasses.dataclass
class _Batch:
    covered: np.ndarray    # int64 positions this batch took care of
    positions: np.ndarray  # int64 positions that have a row
    embeddings: np.ndarray  # float32 [len(positions), dim]
    skipped: list[tuple[int, str, str]]  # (position, path, reason)


def _write_batch(partial: str, seq: int, batch: _Batch) -> None:
    from safetensors.numpy import save
    data = save({"covered": batch.covered.astype(np.int64),
                 "positions": batch.positions.astype(np.int64),
                 "embeddings": np.ascontiguousarray(batch.embeddings, np.float32)},
                metadata={"skipped": json.dumps(batch.skipped)})
    final = os.path.join(partial, f"batch_{seq:06d}.safetensors")
    tmp = final + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(partial)


def _read_batches(partial: str) -> tuple[list[_Batch], int]:
    """The finished batches in `partial` and the next free sequence number. A batch file
    that cannot be read is deleted (its clips are embedded again)."""
    from safetensors import safe_open
    batches, next_seq = [], 0
    for name in sorted(os.listdir(partial)):
        if not (name.startswith("batch_") and name.endswith(".safetensors")):
            continue
        path = os.path.join(partial, name)
        try:
            next_seq = max(next_seq, int(name[len("batch_"):-len(".safetensors")]) + 1)
            with safe_open(path, framework="np") as f:
                skipped = [tuple(s) for s in json.loads(f.metadata()["skipped"])]
                batches.append(_Batch(f.get_tensor("covered"), f.get_tensor("positions"),
                                      f.get_tensor("embeddings"), skipped))
        except Exception as e:  # noqa: BLE001 - any damage: redo that batch
            _LOG.warning("cannot read %s (%s); its clips will be embedded again", path, e)
            os.remove(path)
    return batches, next_seq


def _open_partial(partial: str, state: dict, resume: bool) -> tuple[list[_Batch], int]:
    """Creates the partial folder or checks that the one there was made by this same job."""
    if os.path.isdir(partial) and not resume:
        shutil.rmtree(partial)
    state_path = os.path.join(partial, STATE_FILE)
    if os.path.isdir(partial) and os.path.exists(state_path):
        with open(state_path, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("mode") != state["mode"]:
            raise BuildError(f"{partial} holds an interrupted {old.get('mode')}, not a "
                             f"{state['mode']}; finish that, or pass resume=False to start over")
        diff = header_difference(old["header"], state["header"])
        if diff:
            raise BuildError(f"{partial} holds an interrupted {state['mode']} made with another "
                             f"header ({'; '.join(diff)}, interrupted != now); use the same "
                             "header, or pass resume=False to start over")
        again = "; rerun with the same clips, or pass resume=False to start over"
        if old.get("clips") != state["clips"]:
            then, now = old.get("num_clips"), state["num_clips"]
            change = f"{then} clips then, {now} now" if then != now else "other paths"
            raise BuildError(f"{partial} holds an interrupted {state['mode']} of another clip "
                             f"list ({change}){again}")
        if old.get("base_count") != state["base_count"]:
            raise BuildError(f"{partial} holds an interrupted append to the index when it had "
                             f"{old.get('base_count')} clips; it has {state['base_count']} now"
                             f"{again}")
        return _read_batches(partial)
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    write_json_atomic(state_path, state)
    return [], 0


# -- the embedding loop ------------------------------------------------------------------


def _embed_all(clips: list[dict], embed_fn: EmbedFn, partial: str, state: dict, *,
               sample_rate: int, batch_size: int, resume: bool, progress: bool, mesh,
               strict: bool, dim: int | None, num_workers: int,
               desc: str) -> tuple[np.ndarray, list[dict], list[tuple[str, str]], int, dict]:
    """Embeds `clips` through the partial folder; returns (embeddings, records, skipped,
    reused, resampled), rows in clip order."""
    from tqdm import tqdm
    if batch_size < 1:
        raise BuildError(f"batch_size must be >= 1, got {batch_size}")
    batches, seq = _open_partial(partial, state, resume)
    done = np.zeros(len(clips), bool)
    for b in batches:
        done[b.covered] = True
    reused = int(sum(len(b.positions) for b in batches))
    if batches:
        _LOG.info("%s: resuming, %d of %d clips already done in %s", desc, int(done.sum()),
                  len(clips), partial)
    todo = np.flatnonzero(~done)
    groups = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    dp = _data_parallel_size(mesh)
    padded_size = math.ceil(batch_size / dp) * dp if mesh is not None else None
    for b in batches:
        if len(b.positions):
            dim = dim if dim is not None else b.embeddings.shape[1]
    resampled: dict[int, int] = {}

    def check_output(out, n_in: int, paths: list[str]) -> np.ndarray:
        nonlocal dim
        emb = np.asarray(out, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != n_in:
            raise BuildError(f"embed_fn returned shape {emb.shape} for {n_in} waves "
                             f"(batch starting with {paths[0]}); expected [{n_in}, dim]")
        if dim is not None and emb.shape[1] != dim:
            raise BuildError(f"embed_fn returned dimension {emb.shape[1]}, expected {dim} "
                             f"(batch starting with {paths[0]})")
        dim = emb.shape[1]
        norms = np.linalg.norm(emb.astype(np.float64), axis=1)
        bad = np.flatnonzero(~np.isfinite(norms) | (np.abs(norms - 1) > NORM_TOLERANCE))
        if bad.size:
            raise BuildError(f"embed_fn returned a row with norm {norms[bad[0]]:.6g} for "
                             f"{paths[bad[0]]}; it must return L2-normalised embeddings")
        return (emb / norms[:, None]).astype(np.float32)

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_workers))
    bar = tqdm(total=len(clips), initial=int(done.sum()), unit="clip", desc=desc,
               disable=not progress, dynamic_ncols=True)
    try:
        with _build_logging(progress):
            for group in groups:
                paths = [clips[p]["audio"] for p in group]
                loaded = list(executor.map(lambda p: _read_clip(p, sample_rate), paths))
                waves, positions, skipped = [], [], []
                for pos, path, (wave, info) in zip(group, paths, loaded):
                    if wave is None:
                        reason = str(info)
                    elif wave.size == 0:
                        reason = "no samples"
                    elif float(np.max(np.abs(wave))) < SILENCE_PEAK:
                        reason = "silent (peak below -120 dBFS)"
                    else:
                        reason = None
                    if reason is not None:
                        if strict:
                            raise BuildError(f"cannot use clip {pos}: {_skip_text(path, reason)}")
                        _LOG.warning("skipping clip %d: %s", pos, _skip_text(path, reason))
                        skipped.append((int(pos), path, reason))
                        continue
                    if info is not None and info != sample_rate:
                        if info not in resampled:
                            _LOG.warning("resampling audio from %d Hz to %d Hz (first file: %s); "
                                         "other files at %d Hz are resampled without a message, "
                                         "the summary counts them", info, sample_rate, path, info)
                        resampled[info] = resampled.get(info, 0) + 1
                    waves.append(wave)
                    positions.append(int(pos))
                if waves:
                    batch_in = list(waves)
                    if padded_size is not None and len(batch_in) < padded_size:
                        batch_in += [waves[-1]] * (padded_size - len(batch_in))
                    emb = check_output(embed_fn(batch_in), len(batch_in),
                                       [clips[p]["audio"] for p in positions])[:len(waves)]
                else:
                    emb = np.zeros((0, dim or 0), np.float32)
                _write_batch(partial, seq, _Batch(np.asarray(group, np.int64),
                                                  np.asarray(positions, np.int64), emb, skipped))
                seq += 1
                batches.append(_Batch(group, np.asarray(positions, np.int64), emb, skipped))
                bar.update(len(group))
    finally:
        bar.close()
        executor.shutdown(wait=False)

    positions = np.concatenate([b.positions for b in batches]) if batches else np.zeros(0, np.int64)
    filled = [b.embeddings for b in batches if len(b.positions)]
    emb = np.concatenate(filled) if filled else np.zeros((0, dim or 0), np.float32)
    order = np.argsort(positions, kind="stable")
    skipped_all = sorted(s for b in batches for s in b.skipped)
    return (emb[order], [clips[int(p)] for p in positions[order]],
            [(path, reason) for _, path, reason in skipped_all], reused, resampled)


def _skip_text(path: str, reason: str) -> str:
    """`path: reason`, or the reason alone where it already names the file."""
    return reason if path in reason else f"{path}: {reason}"


def _report(desc: str, directory: str, added: int, total: int,
            skipped: list[tuple[str, str]], resampled: dict[int, int], shown: int = 10) -> None:
    msg = f"{desc} {directory}: {added} of {total} clips embedded"
    if resampled:
        msg += "; resampled " + ", ".join(f"{n} from {r} Hz" for r, n in sorted(resampled.items()))
    if skipped:
        msg += f"; skipped {len(skipped)}: " + "; ".join(
            _skip_text(p, r) for p, r in skipped[:shown])
        if len(skipped) > shown:
            msg += f"; and {len(skipped) - shown} more (BuildSummary.skipped lists all)"
        _LOG.warning(msg)
    else:
        _LOG.info(msg)


# -- public entry points -----------------------------------------------------------------


def build_index(clips: Sequence[Mapping], embed_fn: EmbedFn, directory: str | os.PathLike, *,
                header: Mapping[str, Any], sample_rate: int | None = None, batch_size: int = 32,
                resume: bool = True, progress: bool = True, mesh=None, strict: bool = False,
                overwrite: bool = False, num_workers: int = 4) -> BuildSummary:
    """Embeds `clips` and writes a new index to `directory` (see the module docstring).

    Args:
        clips: records, each with "audio" (a path); all fields are kept in the index.
        embed_fn: `list of 1-D waves at sample_rate -> [len, dim]` L2-normalised.
        directory: the index folder; its partial work goes to `<directory>.partial`.
        header: the build identity, e.g. `make_header(path, fingerprint, settings)`:
            "model" ({"path", "fingerprint"}), "features" (dict), any json extras.
        sample_rate: the rate `embed_fn` wants; default the header's
            (`sample_rate` or `features.sample_rate`). Stored in the index header.
        batch_size: clips per `embed_fn` call (before the mesh padding).
        resume: continue an interrupted build of the same clips and header (False: start
            over, discarding the partial folder).
        progress: show a tqdm bar.
        mesh: pad each batch to a multiple of the mesh's data-parallel size.
        strict: stop at the first unusable clip instead of skipping it.
        overwrite: replace an index already at `directory` (else that is an error).
        num_workers: threads reading audio.

    Raises:
        BuildError: an index is already there (without overwrite), an interrupted build
            with another header / clip list, no clip could be used, a bad embed_fn output,
            or (strict) an unusable clip.
    """
    start = time.perf_counter()
    directory = os.path.abspath(os.fspath(directory))
    clips = _check_clips(clips)
    if not clips:
        raise BuildError(f"no clips to build the index {directory} from")
    if os.path.exists(os.path.join(directory, "header.json")) and not overwrite:
        raise BuildError(f"an index already exists at {directory}; use append_clips to add "
                         "clips, or overwrite=True to rebuild it")
    rate = _resolve_sample_rate(header, sample_rate)
    full_header = _with_rate(header, rate)
    if not isinstance(full_header.get("model"), Mapping) or not full_header["model"].get("fingerprint"):
        raise BuildError("the header needs 'model': {'path', 'fingerprint'} (see make_header)")
    partial = directory + PARTIAL_SUFFIX
    state = {"mode": "build", "header": build_identity(full_header),
             "clips": _clips_digest(clips), "num_clips": len(clips), "base_count": 0}
    emb, records, skipped, reused, resampled = _embed_all(
        clips, embed_fn, partial, state, sample_rate=rate, batch_size=batch_size,
        resume=resume, progress=progress, mesh=mesh, strict=strict, dim=None,
        num_workers=num_workers, desc="building index")
    if not records:
        raise BuildError(f"no clip could be embedded ({len(skipped)} of {len(clips)} skipped: "
                         + "; ".join(_skip_text(p, r) for p, r in skipped[:5]) + ")")
    index = ClapIndex(emb, records, full_header)
    index.save(directory)
    shutil.rmtree(partial, ignore_errors=True)
    _report("built index", directory, len(records), len(clips), skipped, resampled)
    return BuildSummary(index, len(records), reused, skipped, resampled,
                        time.perf_counter() - start)


def append_clips(directory: str | os.PathLike, clips: Sequence[Mapping], embed_fn: EmbedFn, *,
                 header: Mapping[str, Any], sample_rate: int | None = None, batch_size: int = 32,
                 resume: bool = True, progress: bool = True, mesh=None, strict: bool = False,
                 num_workers: int = 4) -> BuildSummary:
    """Embeds `clips` and appends them to the index at `directory`, which must have been
    built with the same header (model, features, sample rate, extras); resumable like
    `build_index` (partial work in `<directory>.partial`)."""
    start = time.perf_counter()
    directory = os.path.abspath(os.fspath(directory))
    clips = _check_clips(clips)
    index = ClapIndex.load(directory)
    rate = _resolve_sample_rate(header, sample_rate if sample_rate is not None
                                else index.header.get("sample_rate"))
    full_header = _with_rate(header, rate)
    diff = header_difference(index.header, full_header)
    if diff:
        raise BuildError(f"index {directory} was built with another header ({'; '.join(diff)}, "
                         "index != now); appending would mix embeddings")
    partial = directory + PARTIAL_SUFFIX
    state = {"mode": "append", "header": build_identity(full_header),
             "clips": _clips_digest(clips), "num_clips": len(clips),
             "base_count": len(index)}
    emb, records, skipped, reused, resampled = _embed_all(
        clips, embed_fn, partial, state, sample_rate=rate, batch_size=batch_size,
        resume=resume, progress=progress, mesh=mesh, strict=strict, dim=index.dim,
        num_workers=num_workers, desc="appending to index")
    if records:
        index.append(emb, records)
        index.save(directory)
    shutil.rmtree(partial, ignore_errors=True)
    _report("appended to index", directory, len(records), len(clips), skipped, resampled)
    return BuildSummary(index, len(records), reused, skipped, resampled,
                        time.perf_counter() - start)


__all__ = ["AUDIO_EXTENSIONS", "BuildError", "BuildSummary", "append_clips", "build_index",
           "clips_from_folder", "clips_from_manifest"]
