"""SALMONN data (jaxaudio.data.salmonn_data): annotation and prompt files in the original
format, clip loading as the original dataset does it, and the generated corpus."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from jaxaudio.data import salmonn_data as sd

from jaxaudio.data import salmonn_corpus as sc
from jaxaudio.data.audio import AudioError

SR = sd.SAMPLE_RATE
HAVE_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed")


def _tree(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 train and 12 eval items, the four tasks taking turns."""
    return sc.ensure_salmonn_corpus(tmp_path_factory.mktemp("corpus"), 24, 12, seed=0,
                                    num_workers=1)


@pytest.fixture()
def no_espeak(monkeypatch):
    monkeypatch.setattr(sc, "espeak_binary", lambda: None)
    monkeypatch.setattr(sc, "_warned_no_espeak", False)


def _write_json(path, doc):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    return str(path)


# ---------------------------------------------------------------- generated corpus


def test_corpus_layout_and_clips(corpus):
    tasks = sc.available_tasks()
    for split, count in (("train", 24), ("eval", 12)):
        with open(corpus[split], encoding="utf-8") as f:
            raw = json.load(f)
        assert list(raw) == ["annotation"] and len(raw["annotation"]) == count
        assert all(not os.path.isabs(i["path"]) for i in raw["annotation"])
        items = sd.read_annotations(corpus[split])
        assert [i["task"] for i in items] == [tasks[k % len(tasks)] for k in range(count)]
        for item in items:
            info = sf.info(item["path"])
            assert (info.samplerate, info.channels, info.subtype) == (SR, 1, "PCM_16")
            assert 1.0 <= info.duration <= sc.MAX_CLIP_SECONDS, (item, info.duration)
            assert item["text"], item
            clip = sd.load_clip(item)
            assert clip.dtype == np.float32 and 0 < np.max(np.abs(clip)) <= 1.0
    table = sd.PromptTable.from_files(corpus["train_prompt"], corpus["test_prompt"])
    # The generated tasks, and stage 3's (its answers come from the stage-2 model).
    assert set(table.train_tasks) == {*sc.ALL_TASKS, "audio_story_telling"} == set(table.test_tasks)
    with open(corpus["params"], encoding="utf-8") as f:
        params = json.load(f)
    assert params["tasks"] == list(tasks) and params["speech"] == HAVE_ESPEAK


def test_corpus_texts(corpus):
    items = sd.read_annotations(corpus["train"]) + sd.read_annotations(corpus["eval"])
    for item in items:
        if item["task"] == "audiocaption":
            assert 1 <= len(item["classes"]) <= 2
            for name in item["classes"]:  # the caption names every sound
                assert any(p in item["text"] for p in sc.SOUND_TEXT[name][0]
                           + sc.SOUND_TEXT[name][1]), item
        elif item["task"] == "QA":
            assert item["Q"].endswith("?") and item["text"], item
            if "classes" in item and item["Q"] in sc._SOUND_QUESTIONS["what"]:
                assert item["text"] == sc.SOUND_TEXT[item["classes"][0]][2]
        else:
            assert item["Q"] == ""


@needs_espeak
def test_corpus_speech(corpus):
    train = sd.read_annotations(corpus["train"])
    evals = sd.read_annotations(corpus["eval"])
    for item in train + evals:
        if item["task"] == "asr":
            words = item["text"].split()
            assert 3 <= len(words) <= 6 and set(words) <= sc.VOCABULARY, item
            assert item["text"] == item["text"].lower()
        if item["task"] == "gender_recognition":
            assert item["voice"] in sc.VOICES[item["text"]], item
    held_out = {i["text"] for i in evals if i["task"] == "asr"}
    assert held_out and not held_out & {i["text"] for i in train if i["task"] == "asr"}
    assert {i["task"] for i in train} == set(sc.ALL_TASKS)


@needs_espeak
def test_synthesize_speech():
    x = sc.synthesize_speech("the red dog runs quickly", "en+f2", 160, 50)
    assert x.dtype == np.float32 and x.ndim == 1
    assert 0.8 * SR < len(x) < 3 * SR  # 5 words at 160 wpm, silence trimmed
    assert np.max(np.abs(x)) > 0.05


def test_sentences_held_out():
    rng = np.random.default_rng(0)
    train = {sc.sample_sentence(rng, 7, "train") for _ in range(600)}
    evals = {sc.sample_sentence(rng, 7, "eval") for _ in range(150)}
    assert not train & evals and len(evals) > 100
    assert 40 <= len(sc.VOCABULARY) <= 60
    for s in train | evals:
        assert 3 <= len(s.split()) <= 6 and set(s.split()) <= sc.VOCABULARY
    # Same vocabulary in both splits: eval introduces no word that train lacks.
    assert {w for s in evals for w in s.split()} <= {w for s in train for w in s.split()}


def test_same_seed_same_files_any_workers(corpus, tmp_path):
    again = sc.ensure_salmonn_corpus(tmp_path / "again", 24, 12, seed=0, num_workers=2)
    first, second = _tree(corpus["root"]), _tree(again["root"])
    assert sorted(first) == sorted(second)
    assert [k for k in first if first[k] != second[k]] == []
    other = sc.ensure_salmonn_corpus(tmp_path / "other", 24, 12, seed=1, num_workers=1)
    assert _tree(other["root"])["train.json"] != first["train.json"]


def test_ensure_reuses_and_regenerates(tmp_path):
    paths = sc.ensure_salmonn_corpus(tmp_path, 4, 2, seed=3, tasks=("audiocaption",),
                                     num_workers=1)
    stamp = os.stat(paths["train"]).st_mtime_ns
    assert sc.ensure_salmonn_corpus(tmp_path, 4, 2, seed=3, tasks=("audiocaption",),
                                    num_workers=1) == paths
    assert os.stat(paths["train"]).st_mtime_ns == stamp  # reused
    # An interrupted run removes params.json first: the corpus does not count as done.
    os.remove(paths["params"])
    sc.ensure_salmonn_corpus(tmp_path, 4, 2, seed=3, tasks=("audiocaption",), num_workers=1)
    assert os.path.exists(paths["params"])
    # A missing clip or other parameters regenerate too.
    os.remove(os.path.join(paths["root"], "wav", "eval_000001.wav"))
    sc.ensure_salmonn_corpus(tmp_path, 4, 2, seed=3, tasks=("audiocaption",), num_workers=1)
    assert os.path.exists(os.path.join(paths["root"], "wav", "eval_000001.wav"))
    sc.ensure_salmonn_corpus(tmp_path, 5, 2, seed=3, tasks=("audiocaption",), num_workers=1)
    assert len(sd.read_annotations(paths["train"])) == 5
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    with pytest.raises(ValueError, match="tasks must be among"):
        sc.ensure_salmonn_corpus(tmp_path, 4, 2, seed=3, tasks=("audio_story_telling",))


def test_without_espeak(no_espeak, tmp_path, caplog):
    assert sc.available_tasks() == ("audiocaption", "QA")
    with caplog.at_level(logging.WARNING, logger=sc.__name__):
        paths = sc.ensure_salmonn_corpus(tmp_path, 8, 2, seed=0, num_workers=1)
        sc.ensure_salmonn_corpus(tmp_path / "b", 2, 2, seed=0, tasks=sc.STAGES[1],
                                 num_workers=1)
    warnings = [r for r in caplog.records if "espeak-ng" in r.getMessage()]
    assert len(warnings) == 1 and "asr" in warnings[0].getMessage()
    items = sd.read_annotations(paths["train"])
    assert {i["task"] for i in items} == {"audiocaption", "QA"}
    assert all("voice" not in i for i in items)  # QA asks about sounds only
    with pytest.raises(ValueError, match="without espeak-ng"):
        sc.ensure_salmonn_corpus(tmp_path / "c", 2, 2, seed=0, tasks=("asr",))
    with pytest.raises(RuntimeError, match="espeak-ng"):
        sc.synthesize_speech("the dog runs", "en+m1", 160, 50)


# ---------------------------------------------------------------- annotations


def test_read_annotations(tmp_path):
    (tmp_path / "data").mkdir()
    ann = _write_json(tmp_path / "data" / "train.json", {"annotation": [
        {"path": "a.wav", "text": "hello world"},
        {"path": "/abs/b.wav", "text": "male", "task": "gender_recognition", "Q": "",
         "speaker": "p1"},
        {"path": "c.wav", "text": "yes", "task": "speaker_verification",
         "expand_wav": ["d.wav", "/abs/e.wav"]},
    ]})
    items = sd.read_annotations(ann)
    assert items[0] == {"path": str(tmp_path / "data" / "a.wav"), "text": "hello world",
                        "task": "asr", "Q": ""}
    assert items[1]["path"] == "/abs/b.wav" and items[1]["speaker"] == "p1"
    assert items[2]["expand_wav"] == [str(tmp_path / "data" / "d.wav"), "/abs/e.wav"]
    rooted = sd.read_annotations(ann, root=tmp_path / "audio")
    assert rooted[0]["path"] == str(tmp_path / "audio" / "a.wav")


@pytest.mark.parametrize("item, message", [
    ({"path": "a.wav"}, 'annotation[1] has no "text"'),
    ({"text": "x"}, 'annotation[1] has no "path"'),
    ({"path": "a.wav", "text": 3}, 'annotation[1] "text" must be a string, got int'),
    ({"path": "a.wav", "text": "x", "task": None}, '"task" must be a string'),
    ({"path": "a.wav", "text": "x", "expand_wav": "b.wav"}, '"expand_wav" must be a list'),
    (["a.wav", "x"], "annotation[1] is a list"),
])
def test_bad_annotation_items(tmp_path, item, message):
    ann = _write_json(tmp_path / "train.json",
                      {"annotation": [{"path": "ok.wav", "text": "ok"}, item]})
    with pytest.raises(sd.AnnotationError) as e:
        sd.read_annotations(ann)
    assert str(e.value).startswith(ann + ": ") and message in str(e.value)
    assert isinstance(e.value, ValueError)


def test_bad_annotation_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(sd.AnnotationError, match="bad.json is not a JSON file"):
        sd.read_annotations(bad)
    nolist = _write_json(tmp_path / "nolist.json", {"data": []})
    with pytest.raises(sd.AnnotationError, match=r"nolist.json: expected \{\"annotation\""):
        sd.read_annotations(nolist)
    with pytest.raises(sd.AnnotationError, match="missing.json"):
        sd.read_annotations(tmp_path / "missing.json")


# ---------------------------------------------------------------- clips


def test_load_clip_stereo_short_expand_and_cut(tmp_path):
    rng = np.random.default_rng(0)
    stereo = rng.uniform(-0.5, 0.5, (2 * SR, 2)).astype(np.float32)
    sf.write(tmp_path / "stereo.wav", stereo, SR, subtype="FLOAT")
    short = rng.uniform(-0.5, 0.5, int(0.3 * SR)).astype(np.float32)
    sf.write(tmp_path / "short.wav", short, SR, subtype="FLOAT")

    x = sd.load_clip({"path": str(tmp_path / "stereo.wav")})
    np.testing.assert_array_equal(x, stereo[:, 0])  # first channel, as the original
    y = sd.load_clip({"path": str(tmp_path / "short.wav")})
    assert y.shape == (SR,) and y.dtype == np.float32  # zero-padded to 1 s
    np.testing.assert_array_equal(y[:len(short)], short)
    assert not y[len(short):].any()

    joined = sd.load_clip({"path": str(tmp_path / "short.wav"),
                           "expand_wav": [str(tmp_path / "stereo.wav")]})
    assert joined.shape == (len(short) + 1600 + 2 * SR,)
    assert not joined[len(short):len(short) + 1600].any()
    np.testing.assert_array_equal(joined[len(short) + 1600:], stereo[:, 0])

    item = {"path": str(tmp_path / "stereo.wav")}
    assert sd.load_clip(item, max_seconds=0.5).shape == (SR // 2,)
    assert sd.load_clip(item, max_seconds=None, min_seconds=3.0).shape == (3 * SR,)


def test_load_clip_resamples_once_logged(tmp_path, caplog):
    tone = np.sin(2 * np.pi * 440 * np.arange(11025) / 11025).astype(np.float32)
    sf.write(tmp_path / "a.wav", tone, 11025)
    sf.write(tmp_path / "b.wav", tone, 11025)
    with caplog.at_level(logging.WARNING):
        a = sd.load_clip({"path": str(tmp_path / "a.wav")})
        sd.load_clip({"path": str(tmp_path / "b.wav")})
    assert abs(len(a) - SR) <= 2
    assert sum("resampling audio from 11025 Hz" in r.getMessage()
               for r in caplog.records) <= 1


def test_load_clip_bad_files(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), SR)
    with pytest.raises(AudioError, match="empty.wav is empty"):
        sd.load_clip({"path": str(tmp_path / "empty.wav")})
    with pytest.raises(AudioError, match=r"annotation\[4\]: cannot read audio file .*gone.wav"):
        sd.load_clip({"path": str(tmp_path / "gone.wav")}, index=4)
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    with pytest.raises(AudioError, match="junk.wav"):
        sd.load_clip({"path": str(tmp_path / "junk.wav")})
    sf.write(tmp_path / "ok.wav", np.ones(100, np.float32) * 0.1, SR)
    with pytest.raises(AudioError, match="gone2.wav"):
        sd.load_clip({"path": str(tmp_path / "ok.wav"),
                      "expand_wav": [str(tmp_path / "gone2.wav")]})


# ---------------------------------------------------------------- prompts


TRAIN_PROMPTS = {
    "asr": [sd.SPEECH_PREFIX + "Write down what is said.",
            sd.SPEECH_PREFIX + "Transcribe it.", sd.SPEECH_PREFIX + "What was said?"],
    "QA": [sd.SPEECH_PREFIX + "{}"],
}
TEST_PROMPTS = {"asr": sd.SPEECH_PREFIX + "Transcribe it.",
                "slot_filling": sd.SPEECH_PREFIX + "According to the speech, what is the {}?"}


def test_prompt_table_from_files(tmp_path):
    table = sd.PromptTable.from_files(_write_json(tmp_path / "train_prompt.json", TRAIN_PROMPTS),
                                      _write_json(tmp_path / "test_prompt.json", TEST_PROMPTS))
    rng = np.random.default_rng(0)
    drawn = {table.train("asr", rng) for _ in range(50)}
    assert drawn == {sd.PROMPT_TEMPLATE.format(p) for p in TRAIN_PROMPTS["asr"]}
    assert table.train("QA", rng, q="Is it raining?") == (
        "USER: <Speech><SpeechHere></Speech> Is it raining?\nASSISTANT:")
    assert table.test("slot_filling", q="date") == (
        "USER: <Speech><SpeechHere></Speech> According to the speech, what is the date?"
        "\nASSISTANT:")
    assert table.test("asr", q="ignored") == sd.PROMPT_TEMPLATE.format(TEST_PROMPTS["asr"])
    before, after = sd.split_prompt(table.test("asr"))
    assert before == "USER: <Speech>" and after == "</Speech> Transcribe it.\nASSISTANT:"

    with pytest.raises(KeyError) as e:
        table.test("emotion_recognition")
    message = str(e.value)
    assert isinstance(e.value, sd.UnknownTaskError)
    assert "'emotion_recognition'" in message and "test_prompt.json" in message
    assert "['asr', 'slot_filling']" in message
    with pytest.raises(sd.UnknownTaskError, match="train_prompt.json"):
        table.train("slot_filling", rng)


def test_prompt_table_rejects_bad_prompts(tmp_path):
    with pytest.raises(sd.PromptError, match="'asr'.*<SpeechHere>"):
        sd.PromptTable({"asr": ["Transcribe the speech."]})
    with pytest.raises(sd.PromptError, match="test.json.*'QA'"):
        sd.PromptTable.from_files(None, _write_json(tmp_path / "test.json", {"QA": "{}"}))
    with pytest.raises(sd.PromptError, match="non-empty list"):
        sd.PromptTable({"asr": sd.SPEECH_PREFIX + "a string, not a list"})
    with pytest.raises(ValueError, match="exactly one <SpeechHere>, found 2"):
        sd.split_prompt("<SpeechHere> and <SpeechHere>")
    with pytest.raises(ValueError, match="found 0"):
        sd.split_prompt("no audio here")


def test_builtin_prompts():
    rng = np.random.default_rng(0)
    for task, prompts in sc.GENERATED_TRAIN_PROMPTS.items():
        assert 3 <= len(prompts) <= 6 and all(p.startswith(sd.SPEECH_PREFIX) for p in prompts)
    table = sd.PromptTable(sc.GENERATED_TRAIN_PROMPTS, sc.DEFAULT_TEST_PROMPTS)
    for task in sc.ALL_TASKS:
        assert table.train(task, rng, q="Q?").startswith("USER: <Speech><SpeechHere></Speech> ")
        assert sd.split_prompt(table.test(task, q="Q?"))[1].endswith("\nASSISTANT:")
    # The released weights' fixed prompts (SALMONN's test_prompt.json).
    assert table.test("asr") == ("USER: <Speech><SpeechHere></Speech> Recognize the speech "
                                 "and give me the transcription.\nASSISTANT:")
    assert table.test("QA", q="What is it?") == (
        "USER: <Speech><SpeechHere></Speech> What is it?\nASSISTANT:")
    assert sc.STAGES[1] == ("asr", "audiocaption")
    assert set(sc.STAGES[2]) == set(sc.ALL_TASKS)
