"""Top-k by cosine over a database of L2-normalised rows: one device, or sharded over a mesh.

One device: `scores = queries @ db^T`, then `lax.top_k`.

Over a mesh (the sharded MIPS pattern of `jax/_src/lax/ann.py`): the database rows are
split over the mesh's devices (padded to a multiple of the device count; a padded row
scores -inf and can never win), the queries are replicated. Inside `shard_map` every
device scores its rows, keeps its local top-k (k capped at the local row count), turns
local positions into global row ids, and the candidates of all devices are gathered
(`all_gather`, O(queries * devices * k) bytes) and merged by one sort. `top_k` never runs
over a globally sharded axis (jax#19271: wrong results on a GPU mesh).

Ties are broken deterministically, the lower row index first: `lax.top_k` keeps the
lower index first among equal values, and the merge sorts by (score desc, index asc).
(faiss 1.15's `IndexFlatIP` lists exactly equal scores the other way round, higher index
first; the sets agree.)

`approximate`: None uses `lax.approx_max_k` on TPU (where it is fast; recall about
`recall_target`) and the exact `lax.top_k` elsewhere (on CPU/GPU `approx_max_k` falls back
to sort-and-slice anyway, jax#24414); True/False force one or the other.

Queries are processed in chunks so one `[chunk, rows per device]` float32 score matrix
stays within `max_score_bytes`; a chunk's row count is a power of two (the last chunk is
padded), so a search compiles once per (mesh, k, database shape, chunk) and later calls
with other query counts reuse it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxaudio.retrieval.index import ClapIndexError

# One [chunk, rows per device] float32 score matrix stays under this many bytes.
DEFAULT_MAX_SCORE_BYTES = 256 * 2**20
DEFAULT_RECALL_TARGET = 0.95


class SearchError(ClapIndexError):
    """A search that cannot run (bad k, empty database, dimension mismatch)."""


def _shard_map(f, *, mesh, in_specs, out_specs):
    """`jax.shard_map` (jax 0.10 / 0.11) or, on older jax, the experimental one.

    The replication check is off: the outputs are merged from an `all_gather` and are the
    same on every device, which the checker of some versions cannot infer.
    """
    sm = getattr(jax, "shard_map", None)
    if sm is not None:
        return sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy  # pragma: no cover
    return legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _axes_of(mesh: Mesh, axis: str | Sequence[str] | None) -> tuple[str, ...]:
    if axis is None:
        return tuple(mesh.axis_names)
    axes = (axis,) if isinstance(axis, str) else tuple(axis)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise SearchError(f"mesh axes {unknown} are not in the mesh {tuple(mesh.axis_names)}")
    return axes


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedDatabase:
    """A database placed on the devices once, for many searches.

    `array` is `[n_padded, dim]` float32 (rows split over `axes` of `mesh`, or on the
    default device without a mesh); `ids` `[n_padded]` int32 holds each row's global id
    (padded rows have ids >= n).
    """
    array: jax.Array
    ids: jax.Array | None
    n: int
    dim: int
    mesh: Mesh | None
    axes: tuple[str, ...]

    @property
    def shards(self) -> int:
        return 1 if self.mesh is None else int(np.prod([self.mesh.shape[a] for a in self.axes]))

    @property
    def rows_per_shard(self) -> int:
        return self.array.shape[0] // self.shards


def prepare_database(db, *, mesh: Mesh | None = None,
                     axis: str | Sequence[str] | None = None) -> PreparedDatabase:
    """Places `db` `[n, dim]` (rows L2-normalised) for `top_k_cosine`.

    With a mesh the rows are split over `axis` (a mesh axis name or several; None = all of
    the mesh's axes), padded at the end to a multiple of the device count. Every process
    passes the whole database (it is host memory, not device memory, that holds it twice).
    """
    db = np.asarray(db, dtype=np.float32)
    if db.ndim != 2:
        raise SearchError(f"the database must be [n, dim], got shape {db.shape}")
    n, dim = db.shape
    if mesh is None:
        return PreparedDatabase(jnp.asarray(db), None, n, dim, None, ())
    axes = _axes_of(mesh, axis)
    shards = int(np.prod([mesh.shape[a] for a in axes]))
    n_pad = max(1, math.ceil(n / shards)) * shards
    if n_pad == n:
        padded = db
    else:
        padded = np.zeros((n_pad, dim), np.float32)
        padded[:n] = db
    ids = np.arange(n_pad, dtype=np.int32)
    row_sharding = NamedSharding(mesh, P(axes, None))
    id_sharding = NamedSharding(mesh, P(axes))
    array = jax.make_array_from_callback(padded.shape, row_sharding, lambda idx: padded[idx])
    ids_arr = jax.make_array_from_callback(ids.shape, id_sharding, lambda idx: ids[idx])
    return PreparedDatabase(array, ids_arr, n, dim, mesh, axes)


def _resolve_approximate(approximate: bool | None, mesh: Mesh | None) -> bool:
    if approximate is not None:
        return bool(approximate)
    platform = (mesh.devices.flat[0].platform if mesh is not None else jax.default_backend())
    return platform == "tpu"


def _scores(q, db):
    # HIGHEST: on GPU/TPU the default float32 matmul may round through tf32/bf16.
    return jnp.einsum("qd,nd->qn", q, db, precision=lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)


@functools.lru_cache(maxsize=64)
def _single_fn(k: int, approximate: bool, recall_target: float):
    def search(db, q):
        s = _scores(q, db)
        if approximate:
            return lax.approx_max_k(s, k, recall_target=recall_target)
        return lax.top_k(s, k)
    return jax.jit(search)


@functools.lru_cache(maxsize=64)
def _sharded_fn(mesh: Mesh, axes: tuple[str, ...], n: int, n_pad: int, k: int, k_local: int,
                approximate: bool, recall_target: float):
    def local(db, ids, q):
        s = _scores(q, db)  # [chunk, rows per device]
        s = jnp.where(ids[None, :] < n, s, -jnp.inf)  # padded rows never win
        if approximate:
            vals, pos = lax.approx_max_k(s, k_local, recall_target=recall_target,
                                         reduction_input_size_override=n_pad)
        else:
            vals, pos = lax.top_k(s, k_local)
        gid = jnp.take(ids, pos)  # local position -> global row id
        vals = lax.all_gather(vals, axes, axis=1, tiled=True)  # [chunk, shards * k_local]
        gid = lax.all_gather(gid, axes, axis=1, tiled=True)
        # Merge: (score desc, id asc); -inf (padding) sorts last.
        neg, gid = lax.sort((-vals, gid), dimension=1, num_keys=2)
        return -neg[:, :k], gid[:, :k]

    f = _shard_map(local, mesh=mesh, in_specs=(P(axes, None), P(axes), P()),
                   out_specs=(P(), P()))
    rep = NamedSharding(mesh, P())
    return jax.jit(f, in_shardings=(NamedSharding(mesh, P(axes, None)),
                                    NamedSharding(mesh, P(axes)), rep),
                   out_shardings=(rep, rep))


def _chunk_rows(q: int, rows_per_device: int, max_score_bytes: int) -> int:
    """Power-of-two query chunk: at most q rounded up, and within the score budget."""
    budget = max(1, max_score_bytes // (4 * max(1, rows_per_device)))
    limit = 1 << (budget.bit_length() - 1)  # largest power of two <= budget
    want = 1 << max(0, (q - 1).bit_length())  # smallest power of two >= q
    return max(1, min(limit, want))


def normalize_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, eps)).astype(np.float32)


def top_k_cosine(db, queries, k: int, *, mesh: Mesh | None = None,
                 axis: str | Sequence[str] | None = None, approximate: bool | None = None,
                 recall_target: float = DEFAULT_RECALL_TARGET,
                 max_score_bytes: int = DEFAULT_MAX_SCORE_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """The `k` database rows most similar to each query by cosine.

    Args:
        db: `[n, dim]` rows, already L2-normalised, or a `PreparedDatabase` (then `mesh`
            and `axis` come from it).
        queries: `[q, dim]` (or `[dim]` for one); normalised here, so the scores are
            cosines whatever their norm (an all-zero query scores 0 everywhere).
        k: results per query, 1 <= k <= n.
        mesh: split the rows over this mesh's devices (see the module docstring).
        axis: the mesh axis (or axes) to split over; None = all of them.
        approximate: None = `approx_max_k` on TPU, exact elsewhere; True/False force it.
        recall_target: for `approx_max_k`.
        max_score_bytes: budget of one device's `[chunk, rows]` score matrix.

    Returns:
        `(scores [q, k] float32, indices [q, k] int32)`, numpy, best first; equal scores
        in increasing index order.

    Raises:
        SearchError: k < 1 or k > n, an empty database, or a dimension mismatch.
    """
    if isinstance(db, PreparedDatabase):
        prepared = db
        if mesh is not None and mesh is not prepared.mesh:
            raise SearchError("top_k_cosine: the database was prepared on another mesh")
    else:
        prepared = None
        db_shape = np.shape(db)
    n, dim = (prepared.n, prepared.dim) if prepared is not None else (
        db_shape if len(db_shape) == 2 else (None, None))
    if n is None:
        raise SearchError(f"the database must be [n, dim], got shape {db_shape}")
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None]
    if queries.ndim != 2:
        raise SearchError(f"queries must be [q, dim], got shape {queries.shape}")
    if queries.shape[1] != dim:
        raise SearchError(f"queries have dimension {queries.shape[1]}, the database {dim}")
    if n == 0:
        raise SearchError("cannot search an empty database (0 rows)")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise SearchError(f"k must be an integer >= 1, got {k!r}")
    k = int(k)
    if k > n:
        raise SearchError(f"k={k} is larger than the database ({n} rows)")
    if prepared is None:
        prepared = prepare_database(db, mesh=mesh, axis=axis)
    q = queries.shape[0]
    if q == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    queries = normalize_rows(queries)
    approximate = _resolve_approximate(approximate, prepared.mesh)

    rows = prepared.rows_per_shard
    chunk = _chunk_rows(q, rows, max_score_bytes)
    if prepared.mesh is None:
        fn = functools.partial(_single_fn(k, approximate, float(recall_target)), prepared.array)
    else:
        k_local = min(k, rows)
        fn = functools.partial(
            _sharded_fn(prepared.mesh, prepared.axes, n, prepared.array.shape[0], k,
                        k_local, approximate, float(recall_target)),
            prepared.array, prepared.ids)
    outs = []
    for start in range(0, q, chunk):
        block = queries[start:start + chunk]
        if block.shape[0] < chunk:
            block = np.concatenate([block, np.zeros((chunk - block.shape[0], dim), np.float32)])
        outs.append(fn(block))  # dispatched asynchronously; gathered below
    scores = np.concatenate([np.asarray(s) for s, _ in outs])[:q].astype(np.float32)
    indices = np.concatenate([np.asarray(i) for _, i in outs])[:q].astype(np.int32)
    return scores, indices
