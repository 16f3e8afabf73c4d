"""The CLAP index: exact top-k against faiss IndexFlatIP (1 device and 8 fake devices),
save/load, append, and every refusal."""
import json
import os

import faiss
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxaudio.retrieval import index as index_mod
from jaxaudio.retrieval.index import ClapIndex, ClapIndexError, make_header
from jaxaudio.retrieval.search import (
    SearchError, _sharded_fn, _single_fn, prepare_database, top_k_cosine)
from jaxaudio.train.mesh import make_mesh

N, DIM, Q = 203, 32, 16  # N not divisible by 8


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    db = unit(rng.standard_normal((N, DIM)))
    q = unit(rng.standard_normal((Q, DIM)))
    # No near-ties among each query's 6 best rows (gaps > 1e-5), so the top-5 order is
    # unambiguous at float32 precision; k = N is checked tie-aware (`assert_same_ranking`).
    best = -np.sort(-(q.astype(np.float64) @ db.astype(np.float64).T), axis=1)[:, :6]
    assert -np.diff(best, axis=1).max() > 1e-5
    return db, q


def assert_same_ranking(db, q, idx, ref_idx, tol=1e-5):
    """Equal indices, except that rows whose exact scores lie within `tol` of each other
    may come in either order."""
    exact = q.astype(np.float64) @ db.astype(np.float64).T
    for row, (a, b) in enumerate(zip(idx, ref_idx)):
        assert len(set(a.tolist())) == len(a)
        np.testing.assert_allclose(exact[row, a], exact[row, b], atol=tol, rtol=0)
        for j in np.flatnonzero(a != b):  # a swap inside a near-tie
            assert abs(exact[row, a[j]] - exact[row, b[j]]) <= tol


@pytest.fixture(scope="module")
def mesh8():
    assert jax.device_count() == 8
    return make_mesh({"data": -1})


@pytest.fixture(scope="module")
def mesh1():
    return make_mesh({"data": 1})


def faiss_search(db, q, k):
    ix = faiss.IndexFlatIP(db.shape[1])
    ix.add(db)
    return ix.search(q, k)


@pytest.mark.parametrize("k", [1, 5, N])
@pytest.mark.parametrize("where", ["default", "mesh1", "mesh8"])
def test_matches_faiss(data, mesh1, mesh8, k, where):
    db, q = data
    mesh = {"default": None, "mesh1": mesh1, "mesh8": mesh8}[where]
    scores, idx = top_k_cosine(db, q, k, mesh=mesh)
    ref_scores, ref_idx = faiss_search(db, q, k)
    assert scores.shape == idx.shape == (Q, k)
    assert scores.dtype == np.float32 and idx.dtype == np.int32
    assert np.abs(scores - ref_scores).max() <= 1e-5
    if k < N:
        np.testing.assert_array_equal(idx, ref_idx)
    else:  # the whole ranking: near-ties (gaps down to ~4e-7 here) may swap
        assert_same_ranking(db, q, idx, ref_idx)
        assert (idx == ref_idx).mean() > 0.99


def test_ties_lower_index_first(mesh8):
    rng = np.random.default_rng(1)
    base = unit(rng.standard_normal((5, 8)))
    db = np.repeat(base, 3, axis=0)  # rows 3i, 3i+1, 3i+2 identical
    q = base[:3]
    ref_scores, ref_idx = faiss_search(db, q, 6)
    for mesh in (None, mesh8):
        scores, idx = top_k_cosine(db, q, 6, mesh=mesh)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
        # faiss lists exact ties highest index first; same sets, our order ascending.
        for a, b in zip(np.split(idx, 2, axis=1), np.split(ref_idx, 2, axis=1)):
            np.testing.assert_array_equal(np.sort(a, axis=1), np.sort(b, axis=1))
            np.testing.assert_array_equal(a, np.sort(a, axis=1))


def test_sharded_options(data, mesh8):
    db, q = data
    ref_scores, ref_idx = faiss_search(db, q, 5)
    # approx_max_k forced (exact fallback off TPU, reduction_input_size_override set);
    # rows split over one named axis; tiny score budget -> many query chunks.
    for kwargs in ({"approximate": True}, {"axis": "data"}, {"max_score_bytes": 4 * 26 * 2}):
        scores, idx = top_k_cosine(db, q, 5, mesh=mesh8, **kwargs)
        np.testing.assert_array_equal(idx, ref_idx)
        assert np.abs(scores - ref_scores).max() <= 1e-5
    scores, idx = top_k_cosine(db, q, 5, approximate=True)
    np.testing.assert_array_equal(idx, ref_idx)
    # A database smaller than the device count: most shards hold only padding.
    small = db[:3]
    scores, idx = top_k_cosine(small, q, 3, mesh=mesh8)
    np.testing.assert_array_equal(idx, faiss_search(small, q, 3)[1])
    assert np.isfinite(scores).all()


def test_compiles_once_per_shape(data, mesh8):
    db, q = data
    prepared = prepare_database(db, mesh=mesh8)
    top_k_cosine(prepared, q[:5], 4)
    fn = _sharded_fn(mesh8, prepared.axes, N, prepared.array.shape[0], 4, 4, False, 0.95)
    size = fn._cache_size()
    top_k_cosine(prepared, q[:7], 4)  # same power-of-two chunk (8): no new compile
    top_k_cosine(prepared, q[:6], 4)
    assert fn._cache_size() == size
    single = prepare_database(db)
    top_k_cosine(single, q[:3], 2)
    before = _single_fn(2, False, 0.95)._cache_size()
    top_k_cosine(single, q[:4], 2)
    assert _single_fn(2, False, 0.95)._cache_size() == before


def test_search_errors(data):
    db, q = data
    with pytest.raises(SearchError, match=f"k={N + 1} is larger than the database \\({N} rows"):
        top_k_cosine(db, q, N + 1)
    with pytest.raises(SearchError, match="k must be"):
        top_k_cosine(db, q, 0)
    with pytest.raises(SearchError, match="dimension 31, the database 32"):
        top_k_cosine(db, q[:, :31], 1)
    with pytest.raises(SearchError, match="empty"):
        top_k_cosine(np.zeros((0, DIM), np.float32), q, 1)


# -- the index ---------------------------------------------------------------------------

HEADER = make_header("/ckpt/clap-htsat", "sha256:aaaa", {"sample_rate": 48000, "n_fft": 1024},
                     sample_rate=48000)


def make_index(n=20, dim=DIM, seed=0):
    rng = np.random.default_rng(seed)
    emb = unit(rng.standard_normal((n, dim)))
    records = [{"audio": f"/data/clip{i:03d}.wav", "caption": f"sound {i}"} for i in range(n)]
    return ClapIndex(emb, records, HEADER)


def test_save_load_round_trip(tmp_path):
    ix = make_index()
    ix.save(tmp_path / "ix")
    assert sorted(os.listdir(tmp_path / "ix")) == ["clips.jsonl", "embeddings.safetensors",
                                                   "header.json"]
    back = ClapIndex.load(tmp_path / "ix")
    np.testing.assert_array_equal(back.embeddings, ix.embeddings)
    assert back.records == ix.records
    assert back.header == ix.header
    h = json.loads((tmp_path / "ix" / "header.json").read_text())
    assert h["count"] == 20 and h["dim"] == DIM and h["version"] == 1
    assert h["model"] == {"path": "/ckpt/clap-htsat", "fingerprint": "sha256:aaaa"}
    assert h["features"]["n_fft"] == 1024 and "created" in h
    assert len((tmp_path / "ix" / "clips.jsonl").read_text().splitlines()) == 20
    # saving over it again leaves no temporary or backup folders behind
    back.save(tmp_path / "ix")
    assert sorted(os.listdir(tmp_path)) == ["ix"]
    # a folder with other things in it is never swapped away
    (tmp_path / "music").mkdir()
    (tmp_path / "music" / "song.wav").write_bytes(b"x")
    with pytest.raises(ClapIndexError, match=r"holds other files than an index \(song.wav\)"):
        ix.save(tmp_path / "music")
    assert os.listdir(tmp_path / "music") == ["song.wav"]


def test_interrupted_save_keeps_the_old_index(tmp_path, monkeypatch):
    ix = make_index()
    ix.save(tmp_path / "ix")
    bigger = make_index(30, seed=1)
    real = index_mod._write_bytes

    def failing(path, data):
        if path.endswith("header.json"):
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(index_mod, "_write_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        bigger.save(tmp_path / "ix")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ix"]
    assert len(ClapIndex.load(tmp_path / "ix")) == 20
    # killed between the two renames: the backup is put back by load
    os.rename(tmp_path / "ix", tmp_path / ".ix.old-123")
    assert len(ClapIndex.load(tmp_path / "ix")) == 20


def test_append_and_search(tmp_path, mesh8):
    ix = make_index()
    extra = unit(np.random.default_rng(5).standard_normal((3, DIM)))
    assert ix.append(extra, [{"audio": f"/data/new{i}.wav"} for i in range(3)]) == 23
    scores, idx = ix.search(extra, 1)
    np.testing.assert_array_equal(idx[:, 0], [20, 21, 22])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    s8, i8 = ix.search(extra, 4, mesh=mesh8)
    ref = faiss_search(ix.embeddings, extra, 4)
    np.testing.assert_array_equal(i8, ref[1])
    hits = ix.results(i8, s8)
    assert hits[0][0]["audio"] == "/data/new0.wav" and hits[0][0]["index"] == 20
    ix.save(tmp_path / "ix")
    back = ClapIndex.load(tmp_path / "ix")
    assert len(back) == 23 and back.header["count"] == 23
    assert back.records[-1] == {"audio": "/data/new2.wav"}
    with pytest.raises(ClapIndexError, match="not L2-normalised"):
        ix.append(extra * 2, [{"audio": "x"}] * 3)
    with pytest.raises(ClapIndexError, match="do not fit an index of dim 32"):
        ix.append(extra[:, :16], [{"audio": "x"}] * 3)
    with pytest.raises(ClapIndexError, match="3 embedding rows but 2 records"):
        ix.append(extra, [{"audio": "x"}] * 2)
    assert len(ix) == 23


def test_search_errors_of_the_index(tmp_path):
    ix = make_index(10)
    ix.save(tmp_path / "ix")
    ix = ClapIndex.load(tmp_path / "ix")
    q = ix.embeddings[:2]
    with pytest.raises(ClapIndexError, match=r"k=11 is larger than index .*ix \(10 clips\)"):
        ix.search(q, 11)
    with pytest.raises(ClapIndexError, match="k must be"):
        ix.search(q, 0)
    with pytest.raises(ClapIndexError, match="do not fit .* of dim 32"):
        ix.search(q[:, :8], 1)
    empty = ClapIndex(np.zeros((0, DIM), np.float32), [], HEADER)
    with pytest.raises(ClapIndexError, match="is empty"):
        empty.search(q, 1)
    ix.check_model({"path": "/moved/clap", "fingerprint": "sha256:aaaa"})  # path may differ
    other = {"path": "/ckpt/other-clap", "fingerprint": "sha256:bbbb"}
    with pytest.raises(ClapIndexError,
                       match=r"index .*ix was built with /ckpt/clap-htsat \(fingerprint "
                             r"sha256:aaaa\), you query with /ckpt/other-clap"):
        ix.check_model(other)
    with pytest.raises(ClapIndexError, match="you query with"):
        ix.search(q, 1, model="sha256:bbbb")
    assert ix.search(q, 1, model="sha256:aaaa")[1][:, 0].tolist() == [0, 1]


@pytest.fixture
def saved(tmp_path):
    make_index(10).save(tmp_path / "ix")
    return tmp_path / "ix"


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_load_missing(saved, tmp_path):
    with pytest.raises(ClapIndexError, match="no such folder"):
        ClapIndex.load(tmp_path / "nothing")
    os.remove(saved / "clips.jsonl")
    with pytest.raises(ClapIndexError, match="missing clips.jsonl"):
        ClapIndex.load(saved)


def test_load_truncated_safetensors(saved):
    path = saved / "embeddings.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ClapIndexError) as e:
        ClapIndex.load(saved)
    assert "embeddings.safetensors: not a readable safetensors file" in one_line(e)


def test_load_garbage_safetensors(saved):
    (saved / "embeddings.safetensors").write_bytes(os.urandom(300))
    with pytest.raises(ClapIndexError) as e:
        ClapIndex.load(saved)
    assert "embeddings.safetensors: not a readable safetensors file" in one_line(e)
    (saved / "embeddings.safetensors").write_bytes(b"")
    with pytest.raises(ClapIndexError, match="embeddings.safetensors: not a readable"):
        ClapIndex.load(saved)


def test_load_row_count_mismatch(saved):
    lines = (saved / "clips.jsonl").read_text().splitlines(keepends=True)
    (saved / "clips.jsonl").write_text("".join(lines[:-1]))
    with pytest.raises(ClapIndexError) as e:
        ClapIndex.load(saved)
    assert one_line(e).endswith("is inconsistent: embeddings.safetensors has 10 rows, "
                                "clips.jsonl has 9 rows, header.json says count 10")
    (saved / "clips.jsonl").write_text("".join(lines))
    header = json.loads((saved / "header.json").read_text())
    (saved / "header.json").write_text(json.dumps(dict(header, count=12)))
    with pytest.raises(ClapIndexError, match="header.json says count 12"):
        ClapIndex.load(saved)


def test_load_bad_contents(saved):
    header = (saved / "header.json").read_text()
    (saved / "header.json").write_text("{not json")
    with pytest.raises(ClapIndexError, match="header.json: invalid JSON"):
        ClapIndex.load(saved)
    (saved / "header.json").write_text(header)
    lines = (saved / "clips.jsonl").read_text().splitlines(keepends=True)
    (saved / "clips.jsonl").write_text("".join(lines[:3] + ['{"caption": "x"}\n'] + lines[4:]))
    with pytest.raises(ClapIndexError, match="clips.jsonl:4: expected a JSON object with an"):
        ClapIndex.load(saved)
    (saved / "clips.jsonl").write_text("".join(lines))
    emb = np.random.default_rng(0).standard_normal((10, DIM)).astype(np.float32)
    save_file({"embeddings": emb}, str(saved / "embeddings.safetensors"))
    with pytest.raises(ClapIndexError, match="embeddings.safetensors: 10 of 10 rows are not "
                                             "L2-normalised"):
        ClapIndex.load(saved)
    save_file({"other": emb}, str(saved / "embeddings.safetensors"))
    with pytest.raises(ClapIndexError, match="has no tensor 'embeddings'"):
        ClapIndex.load(saved)
