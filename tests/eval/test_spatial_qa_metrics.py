"""SpatialSoundQA text metrics (jaxaudio.eval.spatial_qa) on hand-made items."""

import re

import numpy as np
import pytest

from jaxaudio.data import spatial_qa as sqa
from jaxaudio.eval import spatial_qa as ev

SENSOR = "1.0,1.5,2.0"
# Relative to SENSOR: source 1 at (-1, 0.5, -1) (left, front, above, 1.5 m), source 2 at
# (2, -1, 2) (right, behind, below, 3 m).
S1, FAR = "0.0,2.0,1.0", "3.0,0.5,4.0"


def _item(qid, qtype, **extra):
    item = {"question_id": qid, "question_type": qtype, "sensor_position": SENSOR,
            "source_position": S1, "labels": ["bell"], "question": "?"}
    if sqa.TYPE_LETTER[qtype] not in ("A", "B"):
        item.update(source_position2=FAR, labels2=["siren"])
    item.update(extra)
    item["answer"] = sqa.answer_text(item)
    return item


ITEMS = [
    _item(1, sqa.CLASSIFICATION),
    _item(2, sqa.DOA),
    _item(3, sqa.MIXUP_SINGLE_CLASSIFICATION),
    _item(4, sqa.MIXUP_SINGLE_DOA),
    _item(5, sqa.MIXUP_DIRECTION, relation="left"),
    _item(6, sqa.MIXUP_DISTANCE_BOTH, relation="closer"),
    _item(7, sqa.MIXUP_NONBINARY_DIRECTION),
    _item(8, sqa.MIXUP_NONBINARY_DISTANCE),
    _item(9, sqa.MIXUP_NONBINARY_SOURCE, relation="left"),  # bell is left of the siren
]
WRONG = ["siren", "right, behind, below; 4m", "drum; organ", "right, front, above; 3m",
         "No", "No", "right, front, below", "9m", "siren"]
ACCURACIES = ("B/dir_acc", "D/dir_acc", "E/dir_acc", "E/dist_acc", "E/avg",
              "E/nb_dir_acc", "E/nb_dist_acc", "E/nb_src_acc", "A/f1", "C/f1")


def test_hand_made_answers():
    assert [i["answer"] for i in ITEMS] == [
        "bell", "left, front, above; 1.5m", "bell; siren", "left, front, above; 1.5m",
        "Yes", "Yes", "left, front, above", "4.5m", "bell"]  # |(-3, 1.5, -3)| = 4.5


def test_perfect_predictions_score_one():
    m = ev.score(ITEMS, [i["answer"] for i in ITEMS])
    for key in ACCURACIES:
        assert m[key] == 1.0, key
    assert m["B/der"] == m["D/der"] == 0.0 and m["skipped"] == 0
    assert m["E/n"] == 5 and m["A/n"] == 1 and m["E/unparsed"] == 0.0
    assert not any(k.startswith("E/") and k[2:] in ("f1", "precision", "recall") for k in m)


def test_wrong_predictions_score_zero():
    m = ev.score(ITEMS, WRONG)
    for key in ACCURACIES:
        assert m[key] == 0.0, key
    assert m["B/der"] == m["D/der"] == 1.0
    assert m["A/unparsed"] == 0.0  # wrong, not unparseable


@pytest.mark.parametrize("garbage", ["", None, 42, "asdf qwerty", "left right front ;;",
                                     "\u00e9\u00e8\u2603", "-9m? yesno", [1, 2]])
def test_garbage_scores_zero_without_crashing(garbage):
    m = ev.score(ITEMS, [garbage] * len(ITEMS))
    for key in ACCURACIES:
        assert m[key] == 0.0, (key, garbage)
    assert m["B/der"] == m["D/der"] == 1.0


def test_lenient_parsing():
    doa = sqa.DOA
    assert ev.parse_answer(doa, "Right, BACK, below; 3 metres") == {
        "direction": ("right", "behind", "below"), "distance": 3.0}
    assert ev.parse_answer(doa, "The bell is on the left, in front of you and above, "
                                "about 2.5 meters away.") == {
        "direction": ("left", "front", "above"), "distance": 2.5}
    # An axis named both ways, or not at all, is unknown.
    assert ev.parse_answer(doa, "left or right, front; 2m") == {
        "direction": (None, "front", None), "distance": 2.0}
    assert ev.parse_answer(doa, "nowhere") == {"direction": None, "distance": None}
    assert ev.parse_answer(sqa.MIXUP_DIRECTION, "Yes.") == {"yes": True}
    assert ev.parse_answer(sqa.MIXUP_DISTANCE_BOTH, "no, it is farther") == {"yes": False}
    assert ev.parse_answer(sqa.MIXUP_DIRECTION, "maybe") == {"yes": None}
    assert ev.parse_answer(sqa.CLASSIFICATION, "Pure_Tone;  white noise.") == {
        "labels": frozenset({"pure tone", "white noise"})}
    # AudioSet labels contain commas, so only ";" separates labels.
    assert ev.parse_answer(sqa.CLASSIFICATION, "Whack, thwack; Banjo") == {
        "labels": frozenset({"whack, thwack", "banjo"})}
    assert ev.parse_answer(sqa.MIXUP_NONBINARY_SOURCE, "The Banjo.") == {
        "labels": frozenset({"the banjo"})}
    assert ev.parse_answer(sqa.MIXUP_NONBINARY_SOURCE, " ; ") == {"labels": None}
    assert ev.parse_answer("MIXUP_NO_SUCH_TYPE", "banjo") == {}


def test_nonbinary_source_needs_exactly_x():
    item = ITEMS[8]  # X = bell, Y = siren
    cases = {"bell": 1.0, "Bell.": 1.0, " BELL ": 1.0, "siren": 0.0, "bell; siren": 0.0,
             "bell, left of the siren": 0.0, "": 0.0, None: 0.0, ";": 0.0}
    for text, acc in cases.items():
        m = ev.score([item], [text])
        assert m["E/nb_src_acc"] == acc, text
        assert m["E/unparsed"] == (1.0 if text in ("", None, ";") else 0.0), text
    assert set(ev.score([item], ["bell"])) == {"E/nb_src_acc", "E/n", "E/unparsed", "skipped"}


def test_distance_tolerance_is_half_a_metre():
    truth = ITEMS[1]  # 1.5 m
    for pred, error in (("1m", 0.0), ("2m", 0.0), ("0.5m", 1.0), ("2.5m", 1.0)):
        m = ev.score([truth], [f"left, front, above; {pred}"])
        assert m["B/der"] == error, pred
        assert m["B/dir_acc"] == 1.0
    assert ev.score([ITEMS[7]], ["4m"])["E/nb_dist_acc"] == 1.0


def test_label_f1_is_micro_over_items():
    items = [_item(1, sqa.CLASSIFICATION), _item(2, sqa.MIXUP_SINGLE_CLASSIFICATION),
             _item(3, sqa.MIXUP_SINGLE_CLASSIFICATION)]
    m = ev.score(items, ["bell; drum", "siren", "bell; siren; rain"])
    # A: tp 1, fp 1, fn 0. C: tp 1 + 2, fp 0 + 1, fn 1 + 0.
    assert m["A/f1"] == pytest.approx(2 / 3)
    assert m["C/f1"] == pytest.approx(6 / 8)
    assert m["C/precision"] == pytest.approx(3 / 4) and m["C/recall"] == pytest.approx(3 / 4)


def test_predictions_by_question_id_and_length_check():
    answers = {i["question_id"]: i["answer"] for i in ITEMS[1:]}
    m = ev.score(ITEMS, answers)  # item 1 has no prediction: wrong
    assert m["A/f1"] == 0.0 and m["B/dir_acc"] == 1.0
    with pytest.raises(ValueError, match="8 predictions for 9 items"):
        ev.score(ITEMS, [i["answer"] for i in ITEMS[1:]])


def test_items_without_ground_truth_fields_use_their_answer():
    official = [{"question_id": 1, "question_type": "DOA", "answer": "left, behind, above; 2m"},
                {"question_id": 2, "question_type": "MIXUP_DIRECTION", "answer": "No"},
                {"question_id": 3, "question_type": "DOA", "answer": "somewhere"},
                {"question_id": 4, "question_type": "MIXUP_NO_SUCH_TYPE", "answer": "x"},
                {"question_id": 5, "question_type": "MIXUP_NONBINARY_SOURCE", "answer": "Banjo"}]
    m = ev.score(official, ["left, behind, above; 2.5m", "no", "left", "x", "banjo."])
    assert m["B/dir_acc"] == 1.0 and m["B/der"] == 0.0 and m["E/dir_acc"] == 1.0
    assert m["E/nb_src_acc"] == 1.0
    assert m["B/n"] == 1 and m["E/n"] == 2 and m["skipped"] == 2


def test_chance_values():
    chance = ev.chance_metrics(ITEMS)
    uniform, majority = chance["uniform"], chance["majority"]
    assert uniform["B/dir_acc"] == uniform["E/nb_dir_acc"] == 1 / 8
    assert uniform["E/dir_acc"] == uniform["E/avg"] == 0.5
    # True 1.5 m, grid 0.5 .. 1.5 m: 1 and 1.5 are within 0.5 m of it, 0.5 is not.
    assert uniform["B/der"] == pytest.approx(1 / 3)
    # Labels seen: bell, siren (V = 2). A: k = 1 -> 1/2; C: k = 2 -> (4/2) / 2 = 1.
    assert uniform["A/f1"] == 0.5 and uniform["C/f1"] == 1.0
    assert majority["B/dir_acc"] == majority["E/dir_acc"] == 1.0  # one item each
    assert majority["A/f1"] == 1.0 and majority["C/f1"] == pytest.approx(2 / 3)
    assert uniform["E/nb_src_acc"] == 0.5 and majority["E/nb_src_acc"] == 1.0


def test_nonbinary_source_chance():
    sources = [_item(k, sqa.MIXUP_NONBINARY_SOURCE, relation="left", labels=[name])
               for k, name in enumerate(["bell", "bell", "drum", "organ"])]
    chance = ev.chance_metrics(sources)  # no A/C items: V from the E items = 3
    assert chance["uniform"] == {"E/nb_src_acc": pytest.approx(1 / 3)}
    assert chance["majority"] == {"E/nb_src_acc": 0.5}  # bell, 2 of 4
    # With A/C items their labels make V (rain; engine, siren; bell = 4), as for F1.
    labelled = [_item(10, sqa.CLASSIFICATION, labels=["rain"]),
                _item(11, sqa.MIXUP_SINGLE_CLASSIFICATION, labels=["engine"]),
                _item(12, sqa.CLASSIFICATION, labels=["bell"])]
    chance = ev.chance_metrics(sources + labelled)
    assert chance["uniform"]["E/nb_src_acc"] == 0.25
    assert chance["majority"]["E/nb_src_acc"] == 0.5


def test_uniform_chance_matches_random_guessing():
    """Random answers on many items score what chance_metrics says, within noise."""
    rng = np.random.default_rng(0)
    octants = [(a, b, c) for a in ("left", "right") for b in ("front", "behind")
               for c in ("above", "below")]
    items = [_item(k, sqa.DOA, source_position=",".join(map(str, rng.uniform(0.2, 3.8, 3))))
             for k in range(2000)]
    # The uniform guesser's grid: 0.5 m steps up to the largest true distance.
    grid = np.arange(0.5, max(ev.ground_truth(i)["distance"] for i in items) + 0.25, 0.5)
    guesses = [", ".join(octants[rng.integers(8)]) + f"; {rng.choice(grid):g}m"
               for _ in items]
    m, chance = ev.score(items, guesses), ev.chance_metrics(items)["uniform"]
    assert m["B/dir_acc"] == pytest.approx(chance["B/dir_acc"], abs=0.03)
    assert m["B/der"] == pytest.approx(chance["B/der"], abs=0.04)
    assert 0.3 < chance["B/der"] < 0.9


def test_format_table():
    table = ev.format_table(ev.score(ITEMS, WRONG), ev.chance_metrics(ITEMS))
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].split()[:2] == ["F1", "A"]
    assert lines[1].startswith("model") and "0.00 | 0.00" in lines[1]
    assert "100.00 | 100.00" in lines[1]  # DER of all-wrong answers
    assert lines[2].startswith("chance (uniform)") and "12.50 | 12.50" in lines[2]
    assert lines[3].startswith("chance (majority)")
    cells = [dict(zip(re.split(r" {2,}", lines[0]), re.split(r" {2,}", line))) for line in lines]
    assert cells[1]["E-nb dir | dist | src"] == "0.00 | 0.00 | 0.00"
    assert cells[2]["E-nb dir | dist | src"].startswith("12.50 |")
    assert cells[2]["E-nb dir | dist | src"].endswith("| 50.00")  # V = 2 (bell, siren)
    assert cells[3]["E-nb dir | dist | src"] == "100.00 | 100.00 | 100.00"  # one item each
    only_a = ev.format_table(ev.score(ITEMS[:1], ["bell"]), {"A/f1": 0.1}, "BAT")
    assert only_a.splitlines()[1].startswith("BAT") and "100.00 | -" in only_a
    assert only_a.splitlines()[2].startswith("chance ") and "10.00 | -" in only_a
