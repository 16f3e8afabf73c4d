"""Tests of the generated SpatialSoundQA (jaxaudio.data.spatial_qa), read back through the
official-layout reader (jaxaudio.data.spatialsoundqa)."""

import json
import os

import numpy as np
import pytest
import soundfile as sf

from jaxaudio.data import manifest as mf
from jaxaudio.data import spatial_qa as sqa
from jaxaudio.data import spatialsoundqa as ssqa
from jaxaudio.data.sources import SOURCE_CLASSES
from jaxaudio.eval.spatial_qa import parse_answer

SR = 32000
CLIP_S = 0.5


def _generate(root, stage, num_eval, num_train=2, seed=0):
    return sqa.ensure_spatial_qa(root, num_train, num_eval, seed, clip_seconds=CLIP_S,
                                 stage_types=sqa.STAGES[stage], num_workers=1)


@pytest.fixture(scope="module")
def stage3(tmp_path_factory):
    """25 eval items: every letter five times, hence every E type once."""
    return _generate(tmp_path_factory.mktemp("stage3"), 3, 25)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    return _generate(tmp_path_factory.mktemp("stage1"), 1, 40)


def _items(paths, split="eval"):
    with open(paths[split], encoding="utf-8") as f:
        doc = json.load(f)
    assert list(doc) == ["data"]
    return doc["data"]


def _tree(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_same_seed_same_files(stage3, tmp_path):
    again = _generate(tmp_path / "again", 3, 25)
    first, second = _tree(stage3["root"]), _tree(again["root"])
    assert sorted(first) == sorted(second)
    assert all(first[k] == second[k] for k in first), "a file differs between two runs"
    other = _generate(tmp_path / "other", 3, 25, seed=1)
    assert [i["answer"] for i in _items(other)] != [i["answer"] for i in _items(stage3)]


def test_ensure_reuses_and_regenerates(tmp_path):
    paths = _generate(tmp_path, 1, 3, num_train=1)
    stamp = os.stat(paths["eval"]).st_mtime_ns
    assert _generate(tmp_path, 1, 3, num_train=1) == paths
    assert os.stat(paths["eval"]).st_mtime_ns == stamp  # reused, not rewritten
    os.remove(os.path.join(paths["audio_root"], _items(paths)[0]["audio_id"] + ".wav"))
    _generate(tmp_path, 1, 3, num_train=1)  # a missing clip: regenerated
    assert os.path.exists(os.path.join(paths["audio_root"], "eval_000000_1.wav"))
    _generate(tmp_path, 1, 5, num_train=1)  # other parameters: regenerated
    assert len(_items(paths)) == 5
    with open(paths["params"], encoding="utf-8") as f:
        assert json.load(f)["num_eval"] == 5


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="stage_types"):
        sqa.ensure_spatial_qa(tmp_path, 1, 1, 0, stage_types=("A", "F"))
    with pytest.raises(ValueError, match="at least two"):
        sqa.ensure_spatial_qa(tmp_path, 1, 1, 0, classes=["bell"])


def test_official_layout_files(stage3):
    items = _items(stage3) + _items(stage3, "train")
    official = {"audio_id", "reverb_id", "audio_id2", "reverb_id2", "question_id",
                "question_type", "question", "answer"}
    for item in items:
        assert official <= set(item)
        two = sqa.TYPE_LETTER[item["question_type"]] not in ("A", "B")
        assert (item["audio_id2"] is not None) == (item["reverb_id2"] is not None) == two
        for s in ("", "2") if two else ("",):
            x, sr = sf.read(os.path.join(stage3["audio_root"], item["audio_id" + s] + ".wav"))
            assert sr == SR and x.shape == (int(CLIP_S * SR),)  # mono
            rir = np.load(os.path.join(stage3["reverb_root"], "binaural",
                                       item["reverb_id" + s]))
            assert rir.ndim == 2 and rir.shape[0] == 2 and rir.dtype == np.float32
    index = ssqa.read_reverb_index(stage3["eval_reverb"])
    entry = index[items[0]["reverb_id"]]
    for key in ("sensor_position", "source_position", "agent_position"):
        assert mf.parse_xyz(entry[key]).shape == (3,)
    assert entry["source_position"] == items[0]["source_position"]


def test_records_read_back_with_ground_truth(stage3):
    items = _items(stage3)
    records = sqa.split_records(stage3["root"], "eval")
    assert len(records) == len(items)
    for item, rec in zip(items, records):
        assert rec["question_id"] == item["question_id"] and rec["answer"] == item["answer"]
        for s in ("", "2") if item["audio_id2"] else ("",):
            assert (rec["azimuth" + s], rec["elevation" + s]) == (
                item["azimuth" + s], item["elevation" + s])
            assert rec["distance" + s] == round(2 * item["distance_m" + s])
    audio = ssqa.render_record(records[2], clip_seconds=CLIP_S)  # a two-source item
    assert records[2].get("audio2") and audio.shape == (2, int(CLIP_S * SR))
    assert audio.dtype == np.float32 and np.all(np.isfinite(audio)) and audio.any()


@pytest.mark.parametrize("stage,num_eval", [(1, 4), (2, 8), (3, 25)])
def test_every_type_of_the_stage_is_present(stage, num_eval, stage1, stage3, tmp_path):
    paths = {1: stage1, 3: stage3}.get(stage) or _generate(tmp_path, stage, num_eval)
    types = {item["question_type"] for item in _items(paths)}
    wanted = {t for letter in sqa.STAGES[stage] for t in sqa.LETTER_TYPES[letter]}
    assert types == wanted


def test_answers_parse_back_to_ground_truth(stage3):
    for item in _items(stage3) + _items(stage3, "train"):
        truth = sqa.targets(item)
        assert parse_answer(item["question_type"], item["answer"]) == truth, item
        if item["question_type"] in sqa.BINARY_TYPES:
            assert item["answer"] in ("Yes", "No")
        if item["question_type"] == sqa.MIXUP_NONBINARY_SOURCE:  # names Y, asks for X
            assert sqa.label_text(item["labels2"][0]) in item["question"]
        elif item["audio_id2"]:  # questions name sources by their labels
            assert sqa.label_text(item["labels"][0]) in item["question"] or item[
                "question_type"] == sqa.MIXUP_SINGLE_CLASSIFICATION


def test_answer_grammar_examples():
    base = {"sensor_position": "1.0,1.5,2.0", "labels": ["pure_tone"],
            "labels2": ["white_noise"], "source_position": "0.0,2.0,1.0",
            "source_position2": "2.0,1.0,1.0"}
    cases = {
        sqa.CLASSIFICATION: "pure tone",
        sqa.MIXUP_SINGLE_CLASSIFICATION: "pure tone; white noise",
        # (-1, 0.5, -1) from the listener: sqrt(2.25) = 1.5 m
        sqa.DOA: "left, front, above; 1.5m",
        sqa.MIXUP_SINGLE_DOA: "left, front, above; 1.5m",  # source 1 is the named one
        sqa.MIXUP_NONBINARY_DIRECTION: "left, behind, above",  # (-2, 1, 0): z = 0 is behind
        sqa.MIXUP_NONBINARY_DISTANCE: "2m",  # sqrt(5) = 2.24 -> 2
    }
    for qtype, answer in cases.items():
        assert sqa.answer_text(dict(base, question_type=qtype)) == answer
    assert sqa.answer_text(dict(base, question_type=sqa.MIXUP_DIRECTION,
                                relation="left")) == "Yes"
    assert sqa.answer_text(dict(base, question_type=sqa.MIXUP_DISTANCE_BOTH,
                                relation="closer")) == "No"  # 1.5 m and 1.5 m
    assert sqa.answer_text(dict(base, question_type=sqa.MIXUP_NONBINARY_SOURCE,
                                relation="left")) == "pure tone"  # X's label alone
    assert sqa.format_distance(0.74) == "0.5m" and sqa.format_distance(1.3) == "1.5m"


def test_types_take_turns_within_e():
    types = [sqa.question_type_for(i, sqa.STAGES[3]) for i in range(50)]
    assert types[4::5] == list(sqa.LETTER_TYPES["E"]) * 2
    assert sqa.LETTER_TYPES["E"][-1] == sqa.MIXUP_NONBINARY_SOURCE
    assert sqa.TYPE_LETTER[sqa.MIXUP_NONBINARY_SOURCE] == "E"
    assert [sqa.TYPE_LETTER[t] for t in types[:10]] == list("ABCDE") * 2


def test_nonbinary_source_items():
    """The relation holds for X (source 1) relative to Y from the stored positions, the
    question names Y and the relation, and the answer is X's label."""
    relations = set()
    for index in range(24):
        item = sqa.make_item(3, "eval", index, sqa.MIXUP_NONBINARY_SOURCE, SR, 0.05,
                             list(SOURCE_CLASSES))[0]
        first, second = (mf.parse_xyz(item[k]) for k in ("source_position",
                                                          "source_position2"))
        assert np.all(np.abs(first - second) >= sqa.RELATIVE_MARGIN)
        assert item["relation"] in sqa.octant(first - second), item
        assert item["relation"] not in sqa.octant(second - first)  # singles out X
        relations.add(item["relation"])
        x, y = (sqa.label_text(item[k][0]) for k in ("labels", "labels2"))
        assert item["answer"] == x and x != y
        assert sqa._DIRECTION_PHRASE[item["relation"]] in item["question"]
        assert f"the {y}" in item["question"] and x not in item["question"], item["question"]
        assert sqa.targets(item) == {"labels": frozenset({sqa.normalize_label(x)})}
        assert parse_answer(item["question_type"], item["answer"]) == sqa.targets(item)
    assert len(relations) >= 4, relations  # drawn from all three axes' words
    # `targets` does not re-check the relation, nor need the positions.
    assert sqa.targets({"question_type": sqa.MIXUP_NONBINARY_SOURCE, "labels": ["pure_tone"],
                        "relation": "nowhere"}) == {"labels": frozenset({"pure tone"})}


def test_templates_are_paraphrased():
    for qtype in sqa.TYPE_LETTER:
        assert len(set(sqa.TEMPLATES[qtype])) >= 5, qtype
    assert set(sqa.STAGES[3]) == set(sqa.LETTER_TYPES)


def test_interaural_level_difference_agrees_with_left_right(stage1):
    records = sqa.split_records(stage1["root"], "eval")
    items = _items(stage1)
    agree = []
    for item, rec in zip(items, records):
        left, right = (np.sum(c.astype(np.float64) ** 2)
                       for c in ssqa.render_record(rec, clip_seconds=CLIP_S))
        side = "left" if left > right else "right"
        stated = sqa.octant(mf.parse_xyz(item["source_position"])
                            - mf.parse_xyz(item["sensor_position"]))[0]
        if item["question_type"] == sqa.DOA:
            assert item["answer"].startswith(stated)
        agree.append(side == stated)
    assert len(agree) == 40 and np.mean(agree) > 0.8, f"ILD agrees on {np.mean(agree):.0%}"
