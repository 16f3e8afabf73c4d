"""Tests of the generated CLAP corpus: layout, determinism, caching, captions, attributes."""

import json
import os

import numpy as np
import pytest
import soundfile as sf

from jaxaudio.data import clap_corpus as cc
from jaxaudio.data import manifest as mf
from jaxaudio.data import sources

SR = 48000
NUM_TRAIN, NUM_EVAL = 64, 32  # every class four times in train, twice in eval


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("clap_corpus")
    cc.ensure_clap_corpus(root, NUM_TRAIN, NUM_EVAL, seed=3)
    return root


@pytest.fixture(scope="module")
def records(corpus):
    return {split: cc.read_split(corpus, split) for split in cc.SPLITS}


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_layout_and_records(corpus, records):
    assert mf.read_classes(os.path.join(corpus, "classes.txt")) == list(sources.SOURCE_CLASSES)
    assert len(records["train"]) == NUM_TRAIN and len(records["eval"]) == NUM_EVAL
    with open(os.path.join(corpus, "train.jsonl"), encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    assert raw[0]["audio"] == "train/000000.wav"  # stored relative to the root
    for split, recs in records.items():
        for i, r in enumerate(recs):
            assert set(r) == {"audio", "caption", "label", "loudness", "pitch", "duration"}
            assert r["audio"] == os.path.join(str(corpus), split, f"{i:06d}.wav")
            assert r["label"] == cc.CLASSES[i % len(cc.CLASSES)]
            assert r["loudness"] in ("quiet", "loud") and r["duration"] in ("short", "long")
            assert r["pitch"] in (("low", "high") if r["label"] in cc.PITCH_SPLITS else (None,))
            assert isinstance(r["caption"], str) and r["caption"] == r["caption"].strip()
    train = records["train"]
    for key, values in (("loudness", {"quiet", "loud"}), ("duration", {"short", "long"}),
                        ("pitch", {"low", "high", None})):
        assert {r[key] for r in train} == values


def test_wav_files(records):
    for r in records["train"][:16] + records["eval"][:4]:
        x, rate = sf.read(r["audio"], dtype="float32", always_2d=True)
        assert rate == SR and x.shape == (SR, 1)
        assert np.all(np.isfinite(x)) and 0 < np.max(np.abs(x)) <= cc.PEAK_LIMIT + 1e-6


def test_other_rate_and_length(tmp_path):
    cc.ensure_clap_corpus(tmp_path, 3, 1, seed=0, sample_rate=16000, clip_seconds=0.5)
    for split in cc.SPLITS:
        for r in cc.read_split(tmp_path, split):
            x, rate = sf.read(r["audio"], dtype="float32")
            assert rate == 16000 and x.shape == (8000,)
            assert r["duration"] == cc.duration_label(cc.active_duration(x, rate), 0.5)


def test_deterministic_whatever_the_workers(tmp_path, corpus, records):
    """A clip is a function of (seed, split, index): two workers and smaller splits give
    byte-identical files."""
    cc.ensure_clap_corpus(tmp_path, 8, 4, seed=3, num_workers=2)
    ours, theirs = _files(tmp_path), _files(corpus)
    wavs = [p for p in ours if p.endswith(".wav")]
    assert len(wavs) == 12 and all(ours[p] == theirs[p] for p in wavs)
    assert ours["classes.txt"] == theirs["classes.txt"]
    for split, count in (("train", 8), ("eval", 4)):
        assert cc.read_split(tmp_path, split) == [
            {**r, "audio": r["audio"].replace(str(corpus), str(tmp_path))}
            for r in records[split][:count]]


def test_eval_differs_from_train(records):
    assert [r["caption"] for r in records["train"][:NUM_EVAL]] != [
        r["caption"] for r in records["eval"]]
    a, _ = sf.read(records["train"][0]["audio"])
    b, _ = sf.read(records["eval"][0]["audio"])
    assert not np.array_equal(a, b)


def test_second_call_reuses(corpus, monkeypatch):
    before = {p: os.path.getmtime(os.path.join(corpus, p)) for p in _files(corpus)}

    def fail(*args, **kwargs):
        raise AssertionError("regenerated an up-to-date corpus")
    monkeypatch.setattr(cc, "generate_clap_corpus", fail)
    cc.ensure_clap_corpus(corpus, NUM_TRAIN, NUM_EVAL, seed=3)
    assert before == {p: os.path.getmtime(os.path.join(corpus, p)) for p in before}


def test_changed_or_damaged_corpus_regenerates(tmp_path):
    cc.ensure_clap_corpus(tmp_path, 4, 2, seed=0)
    first = cc.read_split(tmp_path, "train")
    cc.ensure_clap_corpus(tmp_path, 4, 2, seed=1)
    with open(os.path.join(tmp_path, "clap_corpus.params.json"), encoding="utf-8") as f:
        assert json.load(f)["seed"] == 1
    second = cc.read_split(tmp_path, "train")
    assert [r["caption"] for r in first] != [r["caption"] for r in second]
    cc.ensure_clap_corpus(tmp_path, 5, 2, seed=1, clip_seconds=0.5)
    assert len(cc.read_split(tmp_path, "train")) == 5
    assert sf.info(os.path.join(tmp_path, "train", "000000.wav")).frames == SR // 2
    os.remove(os.path.join(tmp_path, "eval", "000001.wav"))
    cc.ensure_clap_corpus(tmp_path, 5, 2, seed=1, clip_seconds=0.5)
    assert os.path.exists(os.path.join(tmp_path, "eval", "000001.wav"))


_ATTRIBUTE_WORDS = {
    "loudness": {"loud": ("loud", "strong"), "quiet": ("quiet", "soft", "faint")},
    "pitch": {"high": ("high",), "low": ("low", "deep")},
    "duration": {"short": ("short", "brief", "moment", "instant"),
                 "long": ("long", "sustained", "continuously", "while", "at length")},
}


def test_captions_name_class_and_attributes(records):
    recs = records["train"] + records["eval"]
    for r in recs:
        text = " " + r["caption"]
        assert any(k in text for k in cc.CLASS_KEYWORDS[r["label"]]), r
        for attr, words in _ATTRIBUTE_WORDS.items():
            for value, ws in words.items():
                said = any(w in text for w in ws)
                assert said == (r[attr] == value), (attr, r)
    # Class keywords single out their class.
    for r in recs:
        named = [c for c, ks in cc.CLASS_KEYWORDS.items()
                 if any(k in " " + r["caption"] for k in ks)]
        assert named == [r["label"]], r
    # Several phrasings: captions vary within a class.
    bells = {r["caption"] for r in recs if r["label"] == "bell"}
    assert len(bells) == len([r for r in recs if r["label"] == "bell"])


def test_caption_phrasings_vary():
    rng = np.random.default_rng(0)
    caps = {cc.make_caption(rng, "engine", "quiet", None, "long") for _ in range(200)}
    assert len(caps) > 50
    assert len({c.split()[0] for c in caps}) >= 3  # different templates, not just synonyms


def test_class_prompt():
    assert cc.class_prompt("bell") == "the sound of a bell"
    assert cc.class_prompt("rain") == "the sound of rain"
    assert cc.class_prompt("engine") == "the sound of an engine"
    for name in sources.SOURCE_CLASSES:
        assert any(k in " " + cc.class_prompt(name) for k in cc.CLASS_KEYWORDS[name])
    with pytest.raises(ValueError, match="unknown class 'cat'"):
        cc.class_prompt("cat")


def test_attributes_are_measured_true(records):
    levels, rms = {"loud": [], "quiet": []}, {}
    for r in records["train"] + records["eval"]:
        x, rate = sf.read(r["audio"], dtype="float64")
        level = cc.active_level_dbfs(x, rate)
        levels[r["loudness"]].append(level)
        rms.setdefault((r["label"], r["duration"], r["loudness"]), []).append(np.sqrt(np.mean(x**2)))
        span = cc.active_duration(x, rate)
        assert (span < cc.SHORT_MAX + 0.01) if r["duration"] == "short" else (span >= cc.LONG_MIN), r
        if r["pitch"] is not None:
            hz = cc.measure_pitch(r["label"], x, rate)
            split = cc.PITCH_SPLITS[r["label"]][1]
            assert (hz >= split * cc.PITCH_MARGIN) if r["pitch"] == "high" else (
                hz <= split / cc.PITCH_MARGIN), (hz, r)
    # Loud and quiet clips are far apart (at least 5 dB between the groups).
    assert min(levels["loud"]) > cc.LOUDNESS_THRESHOLD_DBFS + 2
    assert max(levels["quiet"]) < cc.LOUDNESS_THRESHOLD_DBFS - 3
    # Plain RMS too, for the same class and duration.
    for (label, duration, loudness), values in rms.items():
        other = rms.get((label, duration, "quiet"))
        if loudness == "loud" and other:
            assert min(values) > max(other), (label, duration)


@pytest.mark.parametrize("name,factor", [
    ("pure_tone", 1.0), ("organ", 1.0), ("bell", 0.56), ("plucked_string", 1.0), ("vowel_a", 1.0)])
def test_pitch_label_matches_the_drawn_pitch(name, factor, monkeypatch):
    """The generator's own pitch draw (recorded) agrees with the measured label."""
    draws = []
    original = sources._log_uniform

    def record(rng, lo, hi):
        draws.append(original(rng, lo, hi))
        return draws[-1]
    monkeypatch.setattr(sources, "_log_uniform", record)
    index = cc.CLASSES.index(name)
    for k in range(6):
        draws.clear()
        _, r = cc.render_clip(0, "train", index + k * len(cc.CLASSES), 16000, 1.0)
        hz = draws[-1] * factor  # the accepted draw is the last one
        assert ("high" if hz >= cc.PITCH_SPLITS[name][1] else "low") == r["pitch"], (hz, r)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        cc.ensure_clap_corpus(tmp_path, -1, 2, seed=0)
    with pytest.raises(ValueError, match="clip_seconds"):
        cc.ensure_clap_corpus(tmp_path, 1, 1, seed=0, clip_seconds=0.0)
