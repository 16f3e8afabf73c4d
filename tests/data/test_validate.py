"""Bad data refused before the first step (`jaxaudio.data.validate`), every problem named
with its manifest line, all of them in one error."""
import json
import os

import numpy as np
import pytest
import soundfile as sf

from jaxaudio.data import validate as v
from jaxaudio.data.audio import write_wav
from jaxaudio.data.manifest import ManifestError, read_manifest, write_classes, write_manifest

SR = 16000
LABELS = dict(azimuth=10, elevation=90, distance=3)


def _wav(path, channels=2, seconds=0.1, sr=SR):
    write_wav(path, np.full((channels, int(seconds * sr)), 0.1, np.float32), sr)
    return str(path)


@pytest.fixture
def bad_files(tmp_path):
    """name -> (clip path as the manifest gives it, the words its problem line must hold)."""
    _wav(tmp_path / "good.wav")
    _wav(tmp_path / "mono.wav", channels=1)
    _wav(tmp_path / "four.wav", channels=4)
    _wav(tmp_path / "rate8k.wav", sr=8000)
    _wav(tmp_path / "long.wav", seconds=2.0)
    write_wav(tmp_path / "no_samples.wav", np.zeros((2, 0), np.float32), SR)
    (tmp_path / "zero_bytes.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("this is not audio\n")
    (tmp_path / "folder.wav").mkdir()
    return {
        "missing": ("absent.wav", "no such file"),
        "missing_abs": ("/no/such/place/x.wav", "its folder /no/such/place does not exist"),
        "mono": ("mono.wav", "mono, but this model needs 2 channels"),
        "four": ("four.wav", "4 channels, but this model needs 2"),
        "rate8k": ("rate8k.wav", "8000 Hz, but this model needs 16000 Hz"),
        "long": ("long.wav", "longer than the 1.0 s"),
        "no_samples": ("no_samples.wav", "holds no samples"),
        "zero_bytes": ("zero_bytes.wav", "empty file (0 bytes)"),
        "text": ("text.wav", "not an audio file"),
        "directory": ("folder.wav", "is a directory"),
    }


SPEC = v.ClipSpec(channels=2, sample_rate=SR, max_seconds=1.0)


@pytest.mark.parametrize("case", ["missing", "missing_abs", "mono", "four", "rate8k", "long", "no_samples",
                                  "zero_bytes", "text", "directory"])
def test_each_bad_clip_gets_its_line(tmp_path, bad_files, case):
    clip, words = bad_files[case]
    path = tmp_path / "m.jsonl"
    write_manifest(path, [dict(LABELS, audio="good.wav", labels=["a"]), dict(LABELS, audio=clip, labels=["a"])])
    problems = v.check_manifest(str(path), read_manifest(path), SPEC)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:2: {os.path.normpath(os.path.join(tmp_path, clip))}: ")
    assert words in problems[0]


def test_all_problems_of_a_manifest_in_one_error(tmp_path, bad_files):
    path = tmp_path / "m.jsonl"
    records = [dict(LABELS, audio=clip, labels=["dog"]) for clip, _ in bad_files.values()]
    records.insert(3, dict(LABELS, audio="good.wav", labels=["dgo", "cat"]))  # two unknown labels
    write_manifest(path, records)
    text = path.read_text()
    path.write_text("\n" + text)  # a blank first line: line numbers count it
    problems = v.check_manifest(str(path), read_manifest(path), SPEC, classes=["dog", "bird"],
                                classes_name="classes.txt")
    with pytest.raises(v.DataError) as err:
        v.raise_if(problems, "Spatial-AST data")
    message = str(err.value)
    assert message.startswith("Spatial-AST data: 12 problems")
    assert isinstance(err.value, ValueError) and len(err.value.problems) == 12
    for line, (_, words) in zip([2, 3, 4, *range(6, 13)], bad_files.values()):
        assert f"m.jsonl:{line}: " in message and words in message
    assert f"{path}:5: unknown label 'dgo' (not in classes.txt; did you mean 'dog'?)" in message
    assert f"{path}:5: unknown label 'cat' (not in classes.txt)" in message
    # In line order, whatever kind of problem.
    lines = [int(p.split(":")[1]) for p in err.value.problems]
    assert lines == sorted(lines)


def test_listing_is_capped(tmp_path):
    path = tmp_path / "m.jsonl"
    write_manifest(path, [dict(LABELS, audio=f"gone{i}.wav", labels=[]) for i in range(70)])
    with pytest.raises(v.DataError) as err:
        v.raise_if(v.check_manifest(str(path), read_manifest(path), SPEC), "data")
    lines = str(err.value).splitlines()
    assert "data: 70 problems" in lines[0] and "  ... and 20 more" in lines
    assert sum("no such file" in line for line in lines) == v.MAX_LISTED
    assert "relative paths are resolved against the manifest's folder" in lines[-1]
    assert len(err.value.problems) == 70


def test_empty_manifest(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("\n\n")
    assert v.check_manifest(str(path), read_manifest(path), SPEC) == [f"{path}: the manifest holds no records"]


def test_good_data_passes_and_any_spec_accepts_mono_at_other_rates(tmp_path):
    _wav(tmp_path / "a.wav")
    _wav(tmp_path / "b.wav", channels=1, sr=8000, seconds=3.0)
    path = tmp_path / "m.jsonl"
    write_manifest(path, [dict(LABELS, audio="a.wav", labels=["dog"])])
    assert v.check_manifest(str(path), read_manifest(path), SPEC, classes=["dog"]) == []
    write_manifest(path, [{"audio": "b.wav", "caption": "x", "label": "dog"}])
    records = read_manifest(path, required=("audio",))
    assert v.check_manifest(str(path), records, v.ClipSpec(), classes=["dog"], label_field="label") == []
    assert v.check_manifest(str(path), records, v.ClipSpec(min_seconds=5.0))[0].endswith(
        "3.000 s long, shorter than the 5.0 s this model needs")


def test_official_layout_records_check_the_room_response(tmp_path):
    _wav(tmp_path / "mono.wav", channels=1)
    np.save(tmp_path / "rir.npy", np.zeros((2, 100), np.float32))
    np.save(tmp_path / "rir_1ch.npy", np.zeros((100,), np.float32))
    np.save(tmp_path / "rir_empty.npy", np.zeros((2, 0), np.float32))
    (tmp_path / "rir_text.npy").write_text("nope")
    path = tmp_path / "m.jsonl"
    recs = [dict(LABELS, audio="mono.wav", rir=name, labels=[]) for name in
            ("rir.npy", "rir_1ch.npy", "rir_empty.npy", "rir_text.npy", "rir_absent.npy")]
    recs.append(dict(LABELS, audio="mono.wav", rir="rir.npy", audio2="gone.wav", rir2="rir.npy", labels=[]))
    write_manifest(path, recs)
    problems = v.check_manifest(str(path), read_manifest(path), SPEC)  # a mono clip is right here
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6)]
    assert "shape (100,), expected (2, samples)" in problems[0]
    assert "room response with no samples" in problems[1]
    assert "not a .npy array" in problems[2]
    assert "no such file" in problems[3]
    assert "gone.wav: no such file" in problems[4]


def test_a_shared_bad_file_is_read_once_and_listed_once(tmp_path, monkeypatch):
    reads = []
    real = sf.info
    monkeypatch.setattr(v.sf, "info", lambda p: reads.append(p) or real(p))
    _wav(tmp_path / "mono.wav", channels=1)
    entries = [(f"qa.json: question_id {i}", str(tmp_path / "mono.wav"), v.clip_check(SPEC)) for i in range(5)]
    problems = v.check_files(entries)
    assert problems == [f"qa.json: question_id 0: {tmp_path / 'mono.wav'}: mono, but this model needs 2 channels "
                        "(binaural) (and 4 more entries use it)"]
    assert len(reads) == 1


def test_bad_label_field_and_record_check(tmp_path):
    _wav(tmp_path / "a.wav")
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"audio": "a.wav", "caption": "", "label": 3}) + "\n")
    problems = v.check_manifest(str(path), read_manifest(path, required=("audio",)), v.ClipSpec(), classes=["a"],
                                label_field="label", record_check=lambda r: None if r["caption"] else "no caption")
    assert problems == [f"{path}:1: no caption",
                        f"{path}:1: field 'label' must be a class name or a list of them, got 3"]


# --- the manifest reader: every bad line at once, and text that is not a manifest ---------
def test_read_manifest_lists_every_bad_line(tmp_path):
    good = json.dumps(dict(LABELS, audio="a.wav", labels=[]))
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join([good, '{"audio": "b.wav",', good, "[1]", json.dumps({"audio": "c.wav"})]) + "\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    message = str(err.value)
    assert message.startswith(f"{path}: 6 problems")  # the last line lacks 4 fields
    assert f"{path}:2: invalid JSON" in message and f"{path}:4: expected a JSON object, got list" in message
    assert f"{path}:5: missing field 'labels'" in message and f"{path}:5: missing field 'distance'" in message


def test_manifest_that_is_not_text_or_has_a_bom(tmp_path):
    wav = _wav(tmp_path / "a.wav")
    with pytest.raises(ManifestError, match="is not UTF-8 text"):
        read_manifest(wav)  # the clip given as the manifest
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(dict(LABELS, audio="a.wav", labels=[])).encode() + b"\r\n")
    assert read_manifest(path)[0]["audio"] == wav
    write_classes(tmp_path / "classes.txt", ["dog"])
    (tmp_path / "latin1.txt").write_bytes("chien\nb\xe9b\xe9\n".encode("latin-1"))
    from jaxaudio.data.manifest import read_classes
    with pytest.raises(ManifestError, match="latin1.txt is not UTF-8"):
        read_classes(tmp_path / "latin1.txt")


# --- the tasks check their data in prepare_data, before any step ---------------------------
def _spatial_ast_task(tmp_path):
    from train.fixtures import make_clips, tiny_config
    from jaxaudio.tasks.spatial_ast import SpatialASTTask
    make_clips(str(tmp_path), n_train=4, n_eval=2, seconds=0.1)
    return SpatialASTTask(tiny_config(str(tmp_path)))


def test_spatial_ast_refuses_bad_clips_and_labels_of_both_splits(tmp_path):
    task = _spatial_ast_task(tmp_path)
    task.prepare_data()  # the good data passes
    _wav(tmp_path / "mono.wav", channels=1)
    train = read_manifest(tmp_path / "train.jsonl")
    train[1]["audio"], train[2]["labels"] = str(tmp_path / "mono.wav"), ["e"]
    write_manifest(tmp_path / "train.jsonl", train)
    os.remove(tmp_path / "eval_1.wav")
    with pytest.raises(v.DataError) as err:
        task.prepare_data()
    assert [p.split(": ")[0] for p in err.value.problems] == [f"{tmp_path}/train.jsonl:{n}" for n in (2, 3)] + [
        f"{tmp_path}/eval.jsonl:2"]
    assert "mono, but this model needs 2 channels" in err.value.problems[0]
    assert "unknown label 'e'" in err.value.problems[1] and "no such file" in err.value.problems[2]


def test_clap_refuses_missing_captions_unknown_labels_and_bad_clips(tmp_path):
    from configs import clap_tiny
    from jaxaudio.tasks.clap import CLAPTask
    _wav(tmp_path / "a.wav", channels=1, sr=48000)
    (tmp_path / "b.wav").write_text("not audio")
    write_classes(tmp_path / "classes.txt", ["dog", "bell"])
    write_manifest(tmp_path / "train.jsonl", [{"audio": "a.wav", "caption": "a dog", "label": "dog"},
                                              {"audio": "a.wav", "caption": " ", "label": "dgo"},
                                              {"audio": "b.wav", "caption": ["x"]}])
    write_manifest(tmp_path / "eval.jsonl", [{"audio": "gone.wav", "caption": "x", "label": "bell"}])
    c = clap_tiny.get_config()
    c.data.update(dict(generate=False, train_manifest=str(tmp_path / "train.jsonl"),
                       eval_manifest=str(tmp_path / "eval.jsonl"), classes=str(tmp_path / "classes.txt")))
    with pytest.raises(v.DataError, match="CLAP data") as err:
        CLAPTask(c).prepare_data()
    assert err.value.problems == [
        f"{tmp_path}/train.jsonl:2: needs a non-empty 'caption' (a string or a list of strings)",
        f"{tmp_path}/train.jsonl:2: unknown label 'dgo' (not in {tmp_path}/classes.txt; did you mean 'dog'?)",
        f"{tmp_path}/train.jsonl:3: {tmp_path}/b.wav: not an audio file libsndfile can read (Format not recognised.)",
        f"{tmp_path}/eval.jsonl:1: {tmp_path}/gone.wav: no such file"]


def test_salmonn_refuses_bad_clips_and_tasks_without_items(tmp_path):
    from configs import salmonn_tiny
    from jaxaudio.tasks.salmonn import SalmonnTask
    _wav(tmp_path / "ok.wav", channels=1)
    write_wav(tmp_path / "empty.wav", np.zeros((1, 0), np.float32), SR)
    train = {"annotation": [{"path": "ok.wav", "text": "hi"}, {"path": "empty.wav", "text": "x"},
                            {"path": "ok.wav", "text": "y", "expand_wav": ["gone.wav"]}]}
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "eval.json").write_text(json.dumps({"annotation": [{"path": "ok.wav", "text": "z"}]}))
    c = salmonn_tiny.get_config("2")
    c.data.update(dict(generate=False, train_json=str(tmp_path / "train.json"), eval_json=str(tmp_path / "eval.json"),
                       eval_tasks="audiocaption"))
    with pytest.raises(v.DataError, match="SALMONN stage 2 data") as err:
        SalmonnTask(c).prepare_data()
    assert err.value.problems == [
        f"{tmp_path}/train.json: annotation[1]: {tmp_path}/empty.wav: holds no samples",
        f"{tmp_path}/train.json: annotation[2]: {tmp_path}/gone.wav: no such file",
        f"{tmp_path}/eval.json: no item of the tasks audiocaption (config.data.eval_tasks)"]


def test_bat_refuses_missing_clips_and_room_responses_once_per_file(tmp_path):
    from configs import bat_tiny
    from jaxaudio.data import spatial_qa as sqa
    from jaxaudio.tasks.bat import BatTask
    (tmp_path / "audio").mkdir()
    (tmp_path / "reverb" / "binaural").mkdir(parents=True)
    _wav(tmp_path / "audio" / "clip.wav", channels=1)
    np.save(tmp_path / "reverb" / "binaural" / "r0.npy", np.zeros((2, 10), np.float32))
    reverb = {"data": [{"fname": f, "sensor_position": "0,0,0", "source_position": "1,0,0"}
                       for f in ("r0.npy", "r1.npy")]}
    (tmp_path / "reverb.json").write_text(json.dumps(reverb))
    qa = [{"audio_id": a, "reverb_id": r, "audio_id2": None, "reverb_id2": None, "question_id": i,
           "question_type": sqa.CLASSIFICATION, "question": "q?", "answer": "a"}
          for i, (a, r) in enumerate([("clip", "r0.npy"), ("gone", "r0.npy"), ("gone", "r1.npy")])]
    (tmp_path / "qa.json").write_text(json.dumps(qa))
    c = bat_tiny.get_config("1")
    c.data.update(dict(generate=False, train_json=str(tmp_path / "qa.json"), eval_json=str(tmp_path / "qa.json"),
                       train_reverb_json=str(tmp_path / "reverb.json"), eval_reverb_json=str(tmp_path / "reverb.json"),
                       audio_root=str(tmp_path / "audio"), reverb_root=str(tmp_path / "reverb")))
    c.init.update(dict(encoder="", llm=""))
    with pytest.raises(v.DataError, match="BAT stage 1 data") as err:
        BatTask(c).prepare_data()
    qa_file = tmp_path / "qa.json"
    assert err.value.problems[:2] == [
        f"{qa_file}: question_id 1: {tmp_path}/audio/gone.wav: no such file (and 1 more entries use it)",
        f"{qa_file}: question_id 2: {tmp_path}/reverb/binaural/r1.npy: no such file"]
    assert len(err.value.problems) == 4  # the evaluation split reads the same file
    assert "config.data.audio_root/<audio_id>.wav" in str(err.value)
