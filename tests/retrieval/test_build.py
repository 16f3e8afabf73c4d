"""Building a CLAP index from a folder or a manifest with a fake embed_fn: resampling said
once, bad clips skipped and named, resume after an interruption, appends, mesh padding."""
import json
import logging
import os

import jax
import numpy as np
import pytest

from jaxaudio.data.audio import write_wav
from jaxaudio.retrieval import (
    BuildError, ClapIndex, append_clips, build_index, clips_from_folder, clips_from_manifest,
    make_header)
from jaxaudio.train.mesh import make_mesh

RATE = 16000
DIM = 16
HEADER = make_header("/ckpt/clap", "fp-1", {"sample_rate": RATE, "n_fft": 512})


def spectral_embed(waves):
    """Deterministic spectral statistics: log energy in 14 bands + log RMS + zero-crossing
    rate of the first 4096 samples, L2-normalised. [len(waves), 16]."""
    out = []
    for w in waves:
        assert w.ndim == 1 and w.dtype == np.float32
        x = np.zeros(4096, np.float64)
        x[:min(4096, len(w))] = w[:4096]
        mag = np.abs(np.fft.rfft(x)) ** 2
        bands = [np.log1p(b.sum()) for b in np.array_split(mag, 14)]
        rms = np.log1p(np.sqrt(np.mean(x ** 2)) * 100)
        zcr = np.mean(np.abs(np.diff(np.sign(x)))) / 2
        out.append(np.array(bands + [rms, zcr]) + 0.1)
    out = np.asarray(out, np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


class Counting:
    """embed_fn wrapper recording every call's batch; raises on call number `fail_on`."""

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def __call__(self, waves):
        self.calls.append([w.copy() for w in waves])
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise RuntimeError("interrupted")
        return spectral_embed(waves)


def tone(freq, seconds=0.3, rate=RATE, seed=0):
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).standard_normal(t.size) * 0.01
    return (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """11 good clips (one stereo, two stored at 22050 Hz in a subfolder), one unreadable
    file, one silent clip, and a non-audio file that the folder scan ignores."""
    root = tmp_path_factory.mktemp("corpus")
    good = []
    for i in range(8):
        path = root / f"clip{i:02d}.wav"
        write_wav(path, tone(200 + 150 * i, seed=i), RATE)
        good.append(path)
    stereo = root / "clip08_stereo.wav"
    write_wav(stereo, np.stack([tone(900, seed=8), tone(1900, seed=9)]), RATE)
    good.append(stereo)
    for j, f in enumerate((3000, 3500)):
        path = root / "sub" / f"clip{9 + j:02d}_22k.wav"
        write_wav(path, tone(f, rate=22050, seed=10 + j), 22050)
        good.append(path)
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00garbage, not audio" * 5)
    write_wav(root / "silent.wav", np.zeros(RATE // 4, np.float32), RATE)
    (root / "notes.txt").write_text("not audio")
    return root, sorted(str(p) for p in good)


def build(clips, directory, embed=None, **kw):
    kw.setdefault("batch_size", 3)
    kw.setdefault("progress", False)
    return build_index(clips, embed or Counting(), directory, header=HEADER, sample_rate=RATE, **kw)


def test_clip_lists(corpus, tmp_path):
    root, good = corpus
    clips = clips_from_folder(root)
    paths = [c["audio"] for c in clips]
    assert paths == sorted(paths) and all(os.path.isabs(p) for p in paths)
    assert len(paths) == 13 and not any(p.endswith(".txt") for p in paths)
    assert [c["audio"] for c in clips_from_folder(root, extensions=("flac",))] == []
    manifest = tmp_path / "m" / "clips.jsonl"
    manifest.parent.mkdir()
    rel = os.path.relpath(good[0], manifest.parent)
    manifest.write_text(json.dumps({"audio": rel, "caption": "a tone"}) + "\n\n"
                        + json.dumps({"audio": good[1], "label": "beep"}) + "\n")
    recs = clips_from_manifest(manifest)
    assert recs == [{"audio": good[0], "caption": "a tone"}, {"audio": good[1], "label": "beep"}]


def test_build_from_folder(corpus, tmp_path, caplog):
    root, good = corpus
    embed = Counting()
    with caplog.at_level(logging.INFO):
        summary = build(clips_from_folder(root), tmp_path / "ix", embed, progress=True)
    ix = ClapIndex.load(tmp_path / "ix")
    assert [r["audio"] for r in ix.records] == good
    np.testing.assert_array_equal(ix.embeddings, summary.index.embeddings)
    assert ix.header["sample_rate"] == RATE and ix.header["model"]["fingerprint"] == "fp-1"
    assert [os.path.basename(p) for p, _ in summary.skipped] == ["broken.wav", "silent.wav"]
    assert "silent" in summary.skipped[1][1]
    assert summary.resampled == {22050: 2} and summary.added == 11 and summary.reused == 0
    messages = [r.getMessage() for r in caplog.records]
    # the 22.05 kHz files: one line per build, not per file (and not load_audio's own)
    assert sum("resampling audio" in m for m in messages) == 1
    skips = [m for m in messages if m.startswith("skipping")]
    assert len(skips) == 2 and all("\n" not in m for m in skips)
    assert "broken.wav" in skips[0] and "silent.wav" in skips[1]
    assert any("skipped 2" in m and "broken.wav" in m for m in messages)  # the summary
    assert not os.path.exists(str(tmp_path / "ix") + ".partial")
    text = str(summary)
    assert text.startswith(f"index {tmp_path / 'ix'}: 11 clips (+11 now), 2 skipped")
    assert "resampled 2 from 22050 Hz" in text and "skipped" in text.splitlines()[1]
    # each embedding is the fake model's output for the mono wave at RATE
    waves = [w for call in embed.calls for w in call]
    assert len(waves) == 11 and all(w.ndim == 1 for w in waves)
    np.testing.assert_allclose(ix.embeddings, spectral_embed(waves), atol=1e-6)
    # a clip is its own nearest neighbour
    _, idx = ix.search(ix.embeddings, 1)
    assert idx[:, 0].tolist() == list(range(11))
    with pytest.raises(BuildError, match="an index already exists"):
        build(clips_from_folder(root), tmp_path / "ix")
    build(clips_from_folder(root), tmp_path / "ix", overwrite=True)


def test_build_from_manifest_and_strict(corpus, tmp_path):
    root, good = corpus
    manifest = root / "clips.jsonl"
    names = [os.path.relpath(p, root) for p in good[:4]] + ["broken.wav"]
    manifest.write_text("".join(json.dumps({"audio": n, "caption": f"c{i}"}) + "\n"
                                for i, n in enumerate(names)))
    summary = build(clips_from_manifest(manifest), tmp_path / "ix")
    ix = ClapIndex.load(tmp_path / "ix")
    assert ix.records == [{"audio": p, "caption": f"c{i}"} for i, p in enumerate(good[:4])]
    assert summary.skipped[0][0] == str(root / "broken.wav")
    with pytest.raises(BuildError, match=r"cannot use clip 4: cannot read audio file .*broken.wav"):
        build(clips_from_manifest(manifest), tmp_path / "strict", strict=True)


def test_resume_after_interruption(corpus, tmp_path):
    root, good = corpus
    clips = clips_from_folder(root)  # 13 clips, batches of 3: 5 batches
    reference = build(clips, tmp_path / "full").index
    failing = Counting(fail_on=3)
    with pytest.raises(RuntimeError, match="interrupted"):
        build(clips, tmp_path / "ix", failing)
    partial = str(tmp_path / "ix") + ".partial"
    done = sorted(f for f in os.listdir(partial) if f.startswith("batch_"))
    assert done == ["batch_000000.safetensors", "batch_000001.safetensors"]
    assert not os.path.exists(tmp_path / "ix")
    # another header is refused, naming what differs
    other = make_header("/ckpt/clap", "fp-2", {"sample_rate": RATE, "n_fft": 512})
    with pytest.raises(BuildError, match='model.fingerprint: "fp-1" != "fp-2"'):
        build_index(clips, Counting(), tmp_path / "ix", header=other, sample_rate=RATE,
                    batch_size=3, progress=False)
    with pytest.raises(BuildError, match=r"another clip list \(13 clips then, 12 now\)"):
        build(clips[:-1], tmp_path / "ix")
    resumed = Counting()
    summary = build(clips, tmp_path / "ix", resumed)
    first_two = failing.calls[:2]
    assert len(resumed.calls) == 3  # batches 3..5 only
    seen_before = {w.tobytes() for call in first_two for w in call}
    assert not any(w.tobytes() in seen_before for call in resumed.calls for w in call)
    assert summary.reused == sum(len(c) for c in first_two)
    ix = ClapIndex.load(tmp_path / "ix")
    np.testing.assert_array_equal(ix.embeddings, reference.embeddings)
    assert ix.records == reference.records
    assert [p for p, _ in summary.skipped] == [str(root / "broken.wav"), str(root / "silent.wav")]
    assert not os.path.exists(partial)


def test_resume_false_starts_over(corpus, tmp_path):
    clips = clips_from_folder(corpus[0])
    with pytest.raises(RuntimeError):
        build(clips, tmp_path / "ix", Counting(fail_on=2))
    again = Counting()
    build(clips, tmp_path / "ix", again, resume=False)
    assert len(again.calls) == 5


def test_append_clips(corpus, tmp_path):
    root, good = corpus
    clips = clips_from_folder(root)
    reference = build(clips, tmp_path / "full").index
    build(clips[:6], tmp_path / "ix")
    summary = append_clips(tmp_path / "ix", clips[6:], Counting(), header=HEADER,
                           batch_size=4, progress=False)
    assert summary.added == 6  # clips[:6] holds broken.wav and 5 good clips
    ix = ClapIndex.load(tmp_path / "ix")
    np.testing.assert_allclose(ix.embeddings, reference.embeddings, atol=1e-7)
    assert ix.records == reference.records
    other = make_header("/ckpt/clap", "fp-1", {"sample_rate": RATE, "n_fft": 1024})
    with pytest.raises(BuildError, match='features.n_fft: 512 != 1024'):
        append_clips(tmp_path / "ix", clips[:1], Counting(), header=other, progress=False)
    assert len(ClapIndex.load(tmp_path / "ix")) == len(reference)


def test_interrupted_append_resumes(corpus, tmp_path):
    clips = clips_from_folder(corpus[0])
    reference = build(clips, tmp_path / "full").index
    build(clips[:4], tmp_path / "ix")
    kw = dict(header=HEADER, batch_size=2, progress=False)
    with pytest.raises(RuntimeError, match="interrupted"):
        append_clips(tmp_path / "ix", clips[4:], Counting(fail_on=2), **kw)
    assert len(ClapIndex.load(tmp_path / "ix")) == 3  # untouched until the append finishes
    resumed = Counting()
    summary = append_clips(tmp_path / "ix", clips[4:], resumed, **kw)
    assert len(resumed.calls) == 4 and summary.reused == 2  # 5 batches of 2, 1 done
    ix = ClapIndex.load(tmp_path / "ix")
    np.testing.assert_allclose(ix.embeddings, reference.embeddings, atol=1e-7)
    assert ix.records == reference.records
    with pytest.raises(BuildError, match="no such folder"):
        clips_from_folder(tmp_path / "nowhere")
    with pytest.raises(BuildError, match="no clips"):
        build([], tmp_path / "empty")


def test_mesh_padding(corpus, tmp_path):
    clips = clips_from_folder(corpus[0])
    reference = build(clips, tmp_path / "plain").index
    mesh = make_mesh({"data": -1})
    assert jax.device_count() == 8
    embed = Counting()
    build(clips, tmp_path / "ix", embed, mesh=mesh)
    # every batch is padded to 8 (batch 3 rounded up to the data axis), the padding dropped
    assert {len(c) for c in embed.calls} == {8}
    ix = ClapIndex.load(tmp_path / "ix")
    np.testing.assert_array_equal(ix.embeddings, reference.embeddings)
    assert ix.records == reference.records


def test_bad_embed_fn(corpus, tmp_path):
    clips = clips_from_folder(corpus[0])
    with pytest.raises(BuildError, match="norm .* it must return L2-normalised"):
        build(clips, tmp_path / "a", lambda w: 2 * spectral_embed(w), resume=False)
    with pytest.raises(BuildError, match=r"shape \(2, 16\) for 3 waves"):
        build(clips, tmp_path / "b", lambda w: spectral_embed(w)[:2], resume=False)
    with pytest.raises(BuildError, match="no clip could be embedded"):
        build([{"audio": str(corpus[0] / "broken.wav")}], tmp_path / "c")
