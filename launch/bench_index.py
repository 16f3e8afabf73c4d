"""The retrieval index against faiss, and the index build rate (run through `launch/bench.py`):

    python -m launch.bench --model=clap              # towers vs transformers, search vs faiss, build
    python -m launch.bench --model=clap_search --index_sizes=100000,1000000

Search: a database of `n` random L2-normalised 512-d rows (float32) and a batch of queries;
jaxaudio's exact top-k (`retrieval.search.top_k_cosine` on a database placed once over the
local devices) against faiss `IndexFlatIP` (exact inner product, every core) on the same
arrays, taking turns call by call as the other benchmarks do (`take_turns`); queries/s from
the median. Both must return the same neighbours: the overlap of their top-k sets is
reported (1.0 unless two scores tie to float32 precision).

Build: `retrieval.build.build_index` over generated 10 s clips at 48 kHz with a CLAP of the
original size (HTSAT-tiny, random weights; what a real checkpoint costs the same), clips/s
including reading the files and the features.
"""
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np


def _database(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def search_row(n: int, *, dim: int = 512, queries: int = 256, k: int = 10, steps: int = 5, warmup: int = 1,
               faiss: bool = True) -> dict[str, Any]:
    """One database size: jaxaudio and faiss queries/s, their ratio and top-k agreement."""
    import jax

    from jaxaudio.retrieval.search import prepare_database, top_k_cosine
    from jaxaudio.train.mesh import make_mesh
    from launch.bench_backbones import take_turns
    db, q = _database(n, dim, 0), _database(queries, dim, 1)
    mesh = make_mesh({"data": -1}, jax.local_devices()) if jax.local_device_count() > 1 else None
    prepared = prepare_database(db, mesh=mesh)
    out: dict[str, Any] = {}

    def jax_call():
        out["jax"] = top_k_cosine(prepared, q, k)
    index = None
    if faiss:
        import faiss as faiss_lib
        index = faiss_lib.IndexFlatIP(dim)
        index.add(db)

        class FaissTimer:  # `take_turns` times a worker through these two calls
            def time_call(self):
                start = time.perf_counter()
                out["faiss"] = index.search(q, k)
                return time.perf_counter() - start
        worker = FaissTimer()
    else:
        worker = None
    jax_times, faiss_times = take_turns(jax_call, worker, warmup, steps)
    row = dict(n=n, dim=dim, queries=queries, k=k, devices=jax.local_device_count(),
               jax_ms=1e3 * statistics.median(jax_times))
    row["jax_qps"] = queries / (row["jax_ms"] / 1e3)
    if faiss:
        row["faiss_ms"] = 1e3 * statistics.median(faiss_times)
        row["faiss_qps"] = queries / (row["faiss_ms"] / 1e3)
        row["ratio"] = row["faiss_ms"] / row["jax_ms"]
        ours, theirs = out["jax"][1], out["faiss"][1]
        row["topk_overlap"] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ours, theirs)]))
        row["max_score_diff"] = float(np.max(np.abs(out["jax"][0] - out["faiss"][0])))
    return row


def build_row(clips: int = 32, batch: int | None = None, seconds: float = 10.0) -> dict[str, Any]:
    """Index build clips/s with an original-size CLAP (HTSAT-tiny, random weights)."""
    import jax

    from configs import clap as clap_config
    from jaxaudio.data.audio import write_wav
    from jaxaudio.data.sources import organ
    from jaxaudio.infer.clap import ClapEmbedder
    from jaxaudio.retrieval.build import build_index, clips_from_folder
    from jaxaudio.tasks.clap import feature_settings, model_kwargs
    from jaxaudio.models.clap import Clap
    from jaxaudio.train.mesh import make_mesh
    config = clap_config.get_config("unfused")
    accel = jax.devices()[0].platform != "cpu"
    config.model.dtype = "bfloat16" if accel else "float32"
    batch = batch or (64 if accel else 8)
    module = Clap(**model_kwargs(config.model))
    settings = feature_settings(config.data)
    feats = np.zeros((1, 1, settings.frames, settings.num_mel_bins), np.float32)
    variables = jax.jit(module.init)(jax.random.PRNGKey(0), feats, np.zeros(1, bool), np.ones((1, 8), np.int32),
                                     np.ones((1, 8), np.int32))
    import flax.linen as nn
    variables = nn.unbox(variables)
    mesh = make_mesh({"data": -1}, jax.local_devices())
    embedder = ClapEmbedder(module, variables, None, settings, max_text_len=8, batch_size=batch, mesh=mesh,
                            source="random HTSAT-tiny")
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        n = int(seconds * settings.sample_rate)
        for i in range(clips):
            write_wav(os.path.join(tmp, "clips", f"{i:04d}.wav"), organ(rng, settings.sample_rate, n)[None],
                      settings.sample_rate)
        found = clips_from_folder(os.path.join(tmp, "clips"))
        # One untimed batch compiles the forward.
        embedder.embed_audio([np.zeros(n, np.float32)] * min(batch, clips))
        start = time.perf_counter()
        build_index(found, embedder.embed_audio, os.path.join(tmp, "index"), header=embedder.header,
                    sample_rate=settings.sample_rate, batch_size=embedder.batch_size, progress=False)
        seconds_taken = time.perf_counter() - start
    return dict(clips=clips, batch=embedder.batch_size, clip_seconds=seconds, build_s=seconds_taken,
                clips_per_s=clips / seconds_taken, device=jax.devices()[0].device_kind)


def format_search(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'rows':>9}{'dim':>5}{'queries':>8}{'k':>4}{'JAX ms':>10}{'faiss ms':>10}{'ratio':>7}"
             f"{'JAX q/s':>10}{'faiss q/s':>11}{'overlap':>9}"]
    for r in rows:
        faiss_ms = f"{r['faiss_ms']:>10.1f}" if "faiss_ms" in r else f"{'-':>10}"
        ratio = f"{r['ratio']:>7.2f}" if "ratio" in r else f"{'-':>7}"
        fq = f"{r['faiss_qps']:>11.0f}" if "faiss_qps" in r else f"{'-':>11}"
        ov = f"{r['topk_overlap']:>9.3f}" if "topk_overlap" in r else f"{'-':>9}"
        lines.append(f"{r['n']:>9}{r['dim']:>5}{r['queries']:>8}{r['k']:>4}{r['jax_ms']:>10.1f}{faiss_ms}{ratio}"
                     f"{r['jax_qps']:>10.0f}{fq}{ov}")
    return "\n".join(lines)
