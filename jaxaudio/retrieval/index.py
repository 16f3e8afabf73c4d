"""An index of L2-normalised CLAP audio embeddings: save, load, append, search.

On disk an index is a folder of three files:

    embeddings.safetensors   tensor "embeddings", float32 [count, dim], rows L2-normalised
    clips.jsonl              one JSON object per row, in row order; each has "audio" (path)
                             plus whatever the build kept (caption, label, ...)
    header.json              {"format": "jaxaudio-clap-index", "version": 1, "dim", "count",
                              "model": {"path", "fingerprint"}, "features": {...},
                              "created", "updated" (UTC ISO times), + caller fields}

`save` writes the three files into a new sibling folder and swaps it in with renames, so
an interrupted save leaves the previous index whole (at worst renamed to
`.<name>.old-<pid>` for an instant; `load` puts such a backup back). `load` checks
everything it reads and names the file at fault.

Rows must be L2-normalised (norm within 1e-3 of 1): the constructor and `append` refuse
other rows rather than normalising them silently, since a row that is not normalised
means the embeddings did not come from a CLAP `audio_features` call. `normalize_rows`
in `search.py` is there for callers who know what they hold.

The model identity is what `check_model` compares: the fingerprint (the path may differ
when a checkpoint is moved). Records' "audio" paths are stored as given.
"""

from __future__ import annotations

import datetime
import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxaudio.data.manifest import _jsonable

FORMAT = "jaxaudio-clap-index"
VERSION = 1
EMBEDDINGS_FILE = "embeddings.safetensors"
CLIPS_FILE = "clips.jsonl"
HEADER_FILE = "header.json"
FILES = (EMBEDDINGS_FILE, CLIPS_FILE, HEADER_FILE)
NORM_TOLERANCE = 1e-3
# Header fields the index maintains itself; the rest (model, features, sample_rate, ...)
# is the build identity that appends and resumed builds must match.
_OWN_FIELDS = ("format", "version", "dim", "count", "created", "updated")

_LOG = logging.getLogger(__name__)


class ClapIndexError(ValueError):
    """An index that cannot be read, written, extended or searched; the message says why."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def model_identity(path: str | os.PathLike, fingerprint: str) -> dict[str, str]:
    """The `model` entry of a header: the CLAP checkpoint's path and a fingerprint string
    (e.g. a hash of its weights or its hub revision) chosen by the caller."""
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ClapIndexError(f"the model fingerprint must be a non-empty string, got {fingerprint!r}")
    return {"path": os.fspath(path), "fingerprint": fingerprint}


def make_header(model_path: str | os.PathLike, fingerprint: str,
                features: Mapping[str, Any] | Any = None, **extra) -> dict:
    """A header for a new index: the model identity and the feature settings (a dict, or
    an object with `to_dict()` such as `ClapFeatureSettings`), plus any json fields."""
    if features is None:
        features = {}
    elif hasattr(features, "to_dict"):
        features = features.to_dict()
    return {"model": model_identity(model_path, fingerprint), "features": dict(features), **extra}


def build_identity(header: Mapping[str, Any]) -> dict:
    """The part of a header that says how the embeddings were made (all but the index's
    own bookkeeping: format, version, dim, count, times), as plain json."""
    ident = {"features": {}, **{k: v for k, v in header.items() if k not in _OWN_FIELDS}}
    return json.loads(json.dumps(ident, sort_keys=True, default=_jsonable))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): d}


def header_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Lines `key: A != B` for the build-identity fields where two headers differ."""
    fa, fb = _flatten(build_identity(a)), _flatten(build_identity(b))
    missing = "<absent>"
    return [f"{k}: {json.dumps(fa.get(k, missing))} != {json.dumps(fb.get(k, missing))}"
            for k in sorted(set(fa) | set(fb)) if fa.get(k, missing) != fb.get(k, missing)]


def _describe_model(model: Any) -> str:
    if isinstance(model, Mapping):
        return f"{model.get('path', '?')} (fingerprint {model.get('fingerprint', '?')})"
    return f"fingerprint {model}"


def _check_rows(emb: np.ndarray, where: str) -> None:
    if emb.shape[0] == 0:
        return
    norms = np.linalg.norm(emb.astype(np.float64), axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (np.abs(norms - 1.0) > NORM_TOLERANCE))
    if bad.size:
        raise ClapIndexError(
            f"{where}: {bad.size} of {emb.shape[0]} rows are not L2-normalised (first: row "
            f"{bad[0]} with norm {norms[bad[0]]:.6g}); CLAP embeddings must have norm 1")


def _check_records(records: Sequence[Mapping], where: str) -> list[dict]:
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ClapIndexError(f"{where}: record {i} is a {type(rec).__name__}, not a dict")
        if not isinstance(rec.get("audio"), str) or not rec["audio"]:
            raise ClapIndexError(f"{where}: record {i} has no 'audio' path: {dict(rec)!r}")
        out.append(dict(rec))
    return out


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _backups(directory: str) -> list[str]:
    parent, name = os.path.split(os.path.abspath(directory))
    return sorted(glob.glob(os.path.join(parent, f".{name}.old-*")))


def _recover(directory: str) -> None:
    """Puts back the previous index if a save was interrupted between its two renames."""
    if os.path.exists(directory):
        return
    backups = _backups(directory)
    if backups:
        _LOG.warning("index %s is missing but an interrupted save left %s; restoring it",
                     directory, backups[-1])
        os.rename(backups[-1], directory)


class ClapIndex:
    """L2-normalised CLAP audio embeddings, one record per row, and a header.

    Attributes:
        embeddings: float32 `[count, dim]`, rows L2-normalised.
        records: `count` dicts, each with at least "audio" (a path).
        header: dict with "model" ({"path", "fingerprint"}), "features" (dict), "dim",
            "count", "format", "version", "created", "updated".
        directory: where it was loaded from or last saved to (None for a new index).
    """

    def __init__(self, embeddings, records: Sequence[Mapping], header: Mapping[str, Any], *,
                 directory: str | os.PathLike | None = None):
        self.directory = None if directory is None else os.fspath(directory)
        where = self._where()
        emb = np.asarray(embeddings)
        header = dict(header)
        if emb.ndim == 1 and emb.size == 0 and "dim" in header:
            emb = emb.reshape(0, int(header["dim"]))
        if emb.ndim != 2:
            raise ClapIndexError(f"{where}: embeddings must be [count, dim], got shape {emb.shape}")
        if not np.issubdtype(emb.dtype, np.floating):
            raise ClapIndexError(f"{where}: embeddings must be floating point, got {emb.dtype}")
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if not isinstance(header.get("model"), Mapping) or not header["model"].get("fingerprint"):
            raise ClapIndexError(f"{where}: the header needs 'model': {{'path', 'fingerprint'}} "
                                 f"(see make_header), got {header.get('model')!r}")
        if "dim" in header and int(header["dim"]) != emb.shape[1]:
            raise ClapIndexError(f"{where}: the header says dim {header['dim']}, the embeddings "
                                 f"have {emb.shape[1]}")
        if len(records) != emb.shape[0]:
            raise ClapIndexError(f"{where}: {emb.shape[0]} embedding rows but {len(records)} records")
        _check_rows(emb, where)
        self.records = _check_records(records, where)
        self.embeddings = emb
        header.setdefault("features", {})
        header.setdefault("created", _now())
        header.setdefault("updated", header["created"])
        header.update(format=FORMAT, version=VERSION, dim=int(emb.shape[1]), count=int(emb.shape[0]))
        self.header = header
        self._prepared: dict = {}

    # -- basics -----------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def model(self) -> dict:
        return dict(self.header["model"])

    def _where(self) -> str:
        return f"index {self.directory}" if self.directory else "index (not saved)"

    def __repr__(self) -> str:
        return (f"ClapIndex({len(self)} clips, dim {self.dim}, model "
                f"{_describe_model(self.header['model'])}, {self.directory or 'not saved'})")

    def check_model(self, model: Mapping[str, str] | str) -> None:
        """Refuses an index built with another CLAP checkpoint than `model` (a
        `model_identity` dict, or its fingerprint string); fingerprints are compared."""
        theirs = model.get("fingerprint") if isinstance(model, Mapping) else model
        if theirs != self.header["model"].get("fingerprint"):
            raise ClapIndexError(
                f"{self._where()} was built with {_describe_model(self.header['model'])}, "
                f"you query with {_describe_model(model)}")

    # -- growing ----------------------------------------------------------------------

    def append(self, embeddings, records: Sequence[Mapping]) -> int:
        """Adds rows (L2-normalised, same dim) and their records; returns the new count.

        Not-normalised rows are refused, not fixed (see the module docstring). The index in
        memory changes; call `save` to write it.
        """
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim == 1 and emb.size == self.dim:
            emb = emb[None]
        where = f"{self._where()}: append"
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ClapIndexError(f"{where}: embeddings of shape {emb.shape} do not fit an index "
                                 f"of dim {self.dim}")
        if len(records) != emb.shape[0]:
            raise ClapIndexError(f"{where}: {emb.shape[0]} embedding rows but {len(records)} records")
        _check_rows(emb, where)
        recs = _check_records(records, where)
        self.embeddings = np.concatenate([self.embeddings, emb])
        self.records.extend(recs)
        self.header.update(count=len(self), updated=_now())
        self._prepared.clear()
        return len(self)

    # -- searching --------------------------------------------------------------------

    def search(self, queries, k: int, *, mesh=None, axis=None, approximate: bool | None = None,
               model: Mapping[str, str] | str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The `k` rows nearest by cosine to each query (`[q, dim]` or `[dim]`; normalised
        here). With `model`, `check_model` runs first.

        Returns:
            `(scores [q, k] float32, indices [q, k] int32)`, best first, ties in index order;
            `results(indices, scores)` turns them into records.

        Raises:
            ClapIndexError: an empty index, k < 1, k larger than the index, a query
                dimension other than the index's, or another model.
        """
        from jaxaudio.retrieval.search import prepare_database, top_k_cosine
        if model is not None:
            self.check_model(model)
        where = self._where()
        if len(self) == 0:
            raise ClapIndexError(f"{where} is empty: nothing to search")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ClapIndexError(f"k must be an integer >= 1, got {k!r}")
        if k > len(self):
            raise ClapIndexError(f"k={k} is larger than {where} ({len(self)} clips)")
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim not in (1, 2) or q.shape[-1] != self.dim:
            raise ClapIndexError(f"queries of shape {q.shape} do not fit {where} of dim {self.dim}")
        key = (id(mesh), None if axis is None else tuple(np.atleast_1d(axis)))
        prepared = self._prepared.get(key)
        if prepared is None or prepared.mesh is not mesh:
            prepared = prepare_database(self.embeddings, mesh=mesh, axis=axis)
            self._prepared = {key: prepared}  # one placement kept: the database can be large
        return top_k_cosine(prepared, q, int(k), approximate=approximate)

    def results(self, indices, scores=None) -> list[list[dict]]:
        """Records for `search`'s output: per query, a list of `{**record, "index", "score"}`."""
        indices = np.atleast_2d(np.asarray(indices))
        out = []
        for qi, row in enumerate(indices):
            hits = []
            for j, idx in enumerate(row):
                hit = dict(self.records[int(idx)], index=int(idx))
                if scores is not None:
                    hit["score"] = float(np.atleast_2d(scores)[qi, j])
                hits.append(hit)
            out.append(hits)
        return out

    # -- disk -------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the index to `directory`, replacing one that is there, atomically: the
        files go to a new sibling folder (fsynced) that is renamed into place."""
        from safetensors.numpy import save as st_save
        directory = os.path.abspath(os.fspath(directory))
        parent, name = os.path.split(directory)
        os.makedirs(parent, exist_ok=True)
        _recover(directory)
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ClapIndexError(f"cannot save the index to {directory}: it is a file")
        if os.path.isdir(directory):
            others = sorted(set(os.listdir(directory)) - set(FILES))
            if others:  # never swap away a folder that is not (only) an index
                raise ClapIndexError(
                    f"cannot save the index to {directory}: the folder holds other files than "
                    f"an index ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''})")
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        try:
            header = dict(self.header, count=len(self), dim=self.dim)
            _write_bytes(os.path.join(tmp, EMBEDDINGS_FILE),
                         st_save({"embeddings": self.embeddings}, metadata={"format": FORMAT}))
            lines = "".join(json.dumps(r, ensure_ascii=False, default=_jsonable) + "\n"
                            for r in self.records)
            _write_bytes(os.path.join(tmp, CLIPS_FILE), lines.encode("utf-8"))
            _write_bytes(os.path.join(tmp, HEADER_FILE),
                         (json.dumps(header, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
            os.chmod(tmp, 0o755)
            _fsync_dir(tmp)
            if os.path.exists(directory):
                old = os.path.join(parent, f".{name}.old-{os.getpid()}")
                shutil.rmtree(old, ignore_errors=True)
                os.rename(directory, old)
                os.rename(tmp, directory)
                _fsync_dir(parent)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, directory)
                _fsync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.header = header
        self.directory = directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ClapIndex":
        """Reads and checks an index written by `save`.

        Raises:
            ClapIndexError: the folder or a file is missing; the header is not valid JSON
                or not this format; the safetensors file is truncated or garbled or holds
                no float [count, dim] "embeddings"; clips.jsonl has a bad line or a record
                without "audio"; the row counts of embeddings, clips.jsonl and the header
                disagree; rows are not L2-normalised. The message names the file.
        """
        directory = os.path.abspath(os.fspath(directory))
        _recover(directory)
        if not os.path.isdir(directory):
            raise ClapIndexError(f"no index at {directory}: no such folder")
        missing = [f for f in FILES if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise ClapIndexError(f"index {directory} is incomplete: missing {', '.join(missing)}")
        header = _read_header(os.path.join(directory, HEADER_FILE))
        emb = _read_embeddings(os.path.join(directory, EMBEDDINGS_FILE))
        records = _read_records(os.path.join(directory, CLIPS_FILE))
        counts = {EMBEDDINGS_FILE: emb.shape[0], CLIPS_FILE: len(records),
                  HEADER_FILE: header.get("count")}
        if len(set(counts.values())) != 1:
            raise ClapIndexError(f"index {directory} is inconsistent: " + ", ".join(
                f"{f} has {c} rows" if f != HEADER_FILE else f"{f} says count {c}"
                for f, c in counts.items()))
        if header.get("dim") != emb.shape[1]:
            raise ClapIndexError(f"index {directory} is inconsistent: {HEADER_FILE} says dim "
                                 f"{header.get('dim')}, {EMBEDDINGS_FILE} has {emb.shape[1]}")
        _check_rows(emb, os.path.join(directory, EMBEDDINGS_FILE))
        return cls(emb, records, header, directory=directory)


def _read_header(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            header = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise ClapIndexError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ClapIndexError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ClapIndexError(f"{path}: not a {FORMAT} header")
    if header.get("version") != VERSION:
        raise ClapIndexError(f"{path}: index format version {header.get('version')!r}; this "
                             f"code reads version {VERSION}")
    for field in ("dim", "count"):
        if isinstance(header.get(field), bool) or not isinstance(header.get(field), int):
            raise ClapIndexError(f"{path}: field {field!r} must be an int, got {header.get(field)!r}")
    if not isinstance(header.get("model"), dict) or not header["model"].get("fingerprint"):
        raise ClapIndexError(f"{path}: field 'model' must be {{'path', 'fingerprint'}}, "
                             f"got {header.get('model')!r}")
    return header


def _read_embeddings(path: str) -> np.ndarray:
    from safetensors.numpy import load_file
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises SafetensorError, OSError, ValueError, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClapIndexError(f"{path}: not a readable safetensors file (truncated or "
                             f"corrupted?): {msg}") from None
    if "embeddings" not in tensors:
        raise ClapIndexError(f"{path}: has no tensor 'embeddings' (found {sorted(tensors)})")
    emb = tensors["embeddings"]
    if emb.ndim != 2 or emb.dtype != np.float32:
        raise ClapIndexError(f"{path}: 'embeddings' must be float32 [count, dim], got "
                             f"{emb.dtype} {list(emb.shape)}")
    return emb


def _read_records(path: str) -> list[dict]:
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ClapIndexError(f"cannot read {path}: {e}") from None
    if lines and lines[-1] == "":
        lines.pop()
    for lineno, line in enumerate(lines, start=1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ClapIndexError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("audio"), str):
            raise ClapIndexError(f"{path}:{lineno}: expected a JSON object with an 'audio' path")
        records.append(rec)
    return records
