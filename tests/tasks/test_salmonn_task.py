"""The SALMONN task: configs, examples (prompt, labels, truncation, paraphrases), stage
filtering, the jitted loss and eval step, metrics, pretrained parts, bad inputs."""
import json
import os

import jax
import numpy as np
import pytest
import soundfile as sf

from configs import salmonn_7b, salmonn_13b, salmonn_tiny
from jaxaudio.convert.engine import flatten, unflatten
from jaxaudio.convert.io import save_converted
from jaxaudio.data import salmonn_data as sd
from jaxaudio.data import salmonn_corpus as sc
from jaxaudio.data.audio import AudioError
from jaxaudio.models.audio_llm import IGNORE
from jaxaudio.tasks import get_task
from jaxaudio.tasks.audio_llm import model_kwargs
from jaxaudio.tasks.salmonn import PARTS, SCALARS, PromptedText, SalmonnTask

MAX_LEN, MAX_PROMPT_LEN, NEW_TOKENS, EVAL_LIMIT = 48, 24, 6, 4
SAMPLES = 2 * sd.SAMPLE_RATE  # data.max_seconds = chunk_seconds = 2 s
PREFIX = "USER: <Speech>"


def micro_config(root: str, stage: int = 2):
    """salmonn_tiny with every part shrunk: 2 s chunks (10 audio tokens), 32-wide single-layer
    encoders, Q-Former and LLM; 24 + 8 generated clips."""
    c = salmonn_tiny.get_config(str(stage))
    c.model.whisper.update(dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                                max_source_positions=100))
    c.model.beats.update(dict(embed_dim=16, encoder_layers=1, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
                              encoder_attention_heads=2, conv_pos=8, conv_pos_groups=4))
    c.model.connector.update(dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    c.model.llm.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=2))
    c.model.chunk_seconds = 2.0
    c.data.update(dict(root=root, num_train=24, num_eval=8, num_workers=1, max_seconds=2.0, eval_limit=EVAL_LIMIT,
                       max_len=MAX_LEN, max_prompt_len=MAX_PROMPT_LEN))
    c.train.update(dict(steps=2, batch_size=2, eval_batch_size=EVAL_LIMIT, data_threads=1, data_prefetch=0))
    c.eval.update(dict(num_beams=2, max_new_tokens=NEW_TOKENS))
    c.init.checkpoint = ""
    c.mesh.update(dict(data=1))
    return c


def official_config(root: str, stage: int = 2, **data):
    """The same data read as official files (`data.generate=False`): the corpus is in the original layout."""
    c = micro_config(root, stage)
    c.data.update(dict(generate=False, tokenizer=os.path.join(root, "tokenizer.json"),
                       train_json=os.path.join(root, "train.json"), eval_json=os.path.join(root, "eval.json"),
                       train_prompts=os.path.join(root, "train_prompt.json"),
                       test_prompts=os.path.join(root, "test_prompt.json")))
    c.data.update(data)
    return c


def _write_json(path, doc) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    return str(path)


def _after(prompt: str) -> str:
    """What the LLM reads after the audio for a prompt file's entry, as decoded text."""
    return sd.split_prompt(prompt)[1].strip()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    t = SalmonnTask(micro_config(str(tmp_path_factory.mktemp("salmonn_data"))))
    t.prepare_data()
    return t


@pytest.fixture(scope="module")
def fresh(task, tmp_path_factory):
    """A run's initial variables, through the trainer (its compiled, sharded init)."""
    from jaxaudio.train.loop import Trainer
    trainer = Trainer(micro_config(task.config.data.root), str(tmp_path_factory.mktemp("fresh_run")))
    assert trainer.state.extra == {}
    return jax.device_get(trainer.state.params)


def _batch(source, n):
    return {k: np.stack([source[i][k] for i in range(n)]) for k in source[0]}


# ---------------------------------------------------------------- configs


def test_registry_configs_and_bad_fields():
    assert get_task("salmonn") is SalmonnTask
    for module, name, width in ((salmonn_7b, "salmonn_7b", 4096), (salmonn_13b, "salmonn_13b", 5120),
                                (salmonn_tiny, "salmonn_tiny", 128)):
        for stage in (1, 2, 3):
            c = module.get_config(str(stage))
            assert c.task == "salmonn" and c.stage == stage
            assert c.init.checkpoint == ("" if stage == 1 else f"workdir/{name}/stage{stage - 1}")
            kw = model_kwargs(c.model, PARTS, SCALARS)
            assert kw["llm"]["hidden_size"] == width and set(kw) >= {"whisper", "beats", "connector", "lora"}
            if name != "salmonn_tiny":
                assert c.data.train_json == f"data/salmonn_stage{stage}_data.json"
        assert module.get_config().stage == 1
        with pytest.raises(ValueError, match=rf"configs/{name}.py:4: the training stage is 1, 2 or 3"):
            module.get_config("4")
    assert salmonn_tiny.get_config("3").data.train_json == "workdir/salmonn_tiny/activation.json"
    # The original's sizes: 88 audio tokens per 30 s window, LoRA r 8 / alpha 32 on q and v.
    big = SalmonnTask(salmonn_13b.get_config("1")).model
    assert big.tokens_per_chunk() == 88 and big.lora_config().scale == 4.0
    c = salmonn_tiny.get_config()
    c.model.llm.hidden_sise = 3
    with pytest.raises(ValueError, match=r"config.model.llm: unknown Llama fields \['hidden_sise'\]"):
        model_kwargs(c.model, PARTS, SCALARS)
    c = salmonn_tiny.get_config()
    c.model.whisper.n_layers = 2
    with pytest.raises(ValueError, match=r"config.model.whisper: unknown WhisperEncoder fields \['n_layers'\]"):
        SalmonnTask(c)
    c = salmonn_tiny.get_config()
    c.model.chunk_secs = 2.0
    with pytest.raises(ValueError, match=r"config.model: unknown fields \['chunk_secs'\]"):
        model_kwargs(c.model, PARTS, SCALARS)


# ---------------------------------------------------------------- examples


def test_training_examples(task):
    source, items, tok = task.train_source(), task._split("train"), task.tokenizer
    table = task.prompt_table()
    dummy = task.dummy_batch(1)
    prefix = [tok.bos_id, *tok.encode([PREFIX])[0]]
    for i in range(len(source)):
        ex, item = source[i], items[i]
        for k, v in dummy.items():
            assert (ex[k].shape, ex[k].dtype) == (v.shape[1:], v.dtype), k
        np.testing.assert_array_equal(ex["prefix_ids"], prefix)
        n = int(ex["length"])
        np.testing.assert_array_equal(ex["wave"][:n], sd.load_clip(item, max_seconds=2.0))
        assert sd.SAMPLE_RATE <= n <= SAMPLES and not ex["wave"][n:].any()
        ids, mask, labels = ex["suffix_ids"], ex["suffix_mask"], ex["labels"]
        real = int(mask.sum())
        assert mask[:real].all() and not mask[real:].any() and (ids[real:] == tok.pad_id).all()
        labeled = np.flatnonzero(labels != IGNORE)
        # The labels are exactly the answer and EOS, at their own positions, up to the end.
        np.testing.assert_array_equal(labeled, np.arange(labeled[0], real))
        np.testing.assert_array_equal(labels[labeled], ids[labeled])
        assert ids[real - 1] == tok.eos_id and tok.decode(ids[labeled]) == item["text"]
        # Before them: the rest of one of the task's training prompts.
        paraphrases = {_after(sd.PROMPT_TEMPLATE.format(p.replace("{}", item["Q"])))
                       for p in table.paraphrases(item["task"])}
        assert tok.decode(ids[:labeled[0]]) in paraphrases
        assert int(ex["index"]) == i


def test_max_txt_len_cuts_the_answer_and_its_eos(task):
    """As the original's `text + eos` tokenized with truncation to max_txt_len; the cut holds
    also when max_len cuts the same example."""
    tok, table = task.tokenizer, task.prompt_table()
    item = next(it for it in task._split("train") if len(tok.encode([it["text"]])[0]) >= 4)
    answer = tok.encode([item["text"]])[0]
    after = len(tok.encode([sd.split_prompt(table.test(item["task"], item["Q"]))[1]])[0])

    def example(max_txt_len, max_len=MAX_LEN):
        return PromptedText(tok, table, max_len, max_txt_len, MAX_PROMPT_LEN).example(item, None)

    for max_txt_len, kept, eos in ((len(answer) + 1, answer, True), (len(answer), answer, False),
                                   (3, answer[:3], False)):
        ex = example(max_txt_len)
        labeled = np.flatnonzero(ex["labels"] != IGNORE)
        assert list(ex["labels"][labeled]) == kept + [tok.eos_id] * eos, max_txt_len
        assert labeled[0] == after and int(ex["suffix_mask"].sum()) == after + len(kept) + eos
    # max_len ends the sequence inside the cut answer: every token up to max_len stays.
    ex = example(3, max_len=after + 2)
    assert list(ex["suffix_ids"]) == [*ex["suffix_ids"][:after], *answer[:2]] and ex["suffix_mask"].all()
    assert list(ex["labels"][after:]) == answer[:2]


def test_augment_draws_paraphrases_per_epoch_and_index(task):
    source, items, tok = task.train_source(), task._split("train"), task.tokenizer
    n, epochs = len(source), 4
    augmented = task.augment(source.repeat(epochs), seed=3)

    def prompt_of(ex):
        labeled = np.flatnonzero(ex["labels"] != IGNORE)
        return tok.decode(ex["suffix_ids"][:labeled[0]])

    per_item = {}
    for i in range(n):
        for e in range(epochs):
            ex = augmented[e * n + i]
            assert int(ex["index"]) == i and tok.decode(ex["labels"][ex["labels"] != IGNORE]) == items[i]["text"]
            per_item.setdefault(i, []).append(prompt_of(ex))
    # Epochs of one item, and items of one task in one epoch, see different paraphrases.
    assert max(len(set(p)) for p in per_item.values()) > 1
    for name in {it["task"] for it in items} - {"QA"}:  # QA prompts differ by question anyway
        first_epoch = {per_item[i][0] for i in range(n) if items[i]["task"] == name}
        assert len(first_epoch) > 1, name
    # Seeded per index: the same dataset gives the same prompts again (a resumed run repeats them).
    again = task.augment(source.repeat(epochs), seed=3)
    assert [prompt_of(again[k]) for k in range(0, epochs * n, 5)] == [prompt_of(augmented[k])
                                                                      for k in range(0, epochs * n, 5)]


def test_eval_examples_use_the_test_prompt_left_padded(task):
    source, items, tok = task.eval_source(), task._split("eval"), task.tokenizer
    table = task.prompt_table()
    assert len(source) == EVAL_LIMIT
    for i in range(len(source)):
        ex, item = source[i], items[i]
        want = _after(table.test(item["task"], item["Q"]))
        assert want == _after(sd.PROMPT_TEMPLATE.format(sc.GENERATED_TEST_PROMPTS[item["task"]]
                                                        .replace("{}", item["Q"])))
        pids, pmask = ex["prompt_ids"], ex["prompt_mask"]
        assert pids.shape == pmask.shape == (MAX_PROMPT_LEN,)
        k = int(pmask.sum())
        assert not pmask[:-k].any() and pmask[-k:].all() and (pids[:-k] == tok.pad_id).all()
        assert tok.decode(pids[-k:]) == want
        # The teacher-forced text starts with the same prompt.
        np.testing.assert_array_equal(ex["suffix_ids"][:k], pids[-k:])
        assert ex["labels"][k - 1] == IGNORE and ex["labels"][k] == ex["suffix_ids"][k]


def test_official_layout_takes_the_same_path(task):
    official = SalmonnTask(official_config(task.config.data.root))
    for split, i in (("train", 1), ("eval", 2)):
        a = getattr(official, f"{split}_source")()[i]
        b = getattr(task, f"{split}_source")()[i]
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_stage_task_filtering(task, tmp_path):
    root, here = task.config.data.root, set(sc.available_tasks())
    stage1 = SalmonnTask(micro_config(root, 1))
    for split in ("train", "eval"):
        assert {it["task"] for it in stage1._split(split)} == set(sc.STAGES[1]) & here
    every = sd.read_annotations(os.path.join(root, "train.json"))
    assert len(stage1.train_source()) == sum(it["task"] in sc.STAGES[1] for it in every)
    assert {it["task"] for it in task._split("train")} == set(sc.STAGES[2]) & here
    # Stage 3 trains on its own file (answers of the stage-2 model) and is evaluated on stage 2's tasks.
    clips = every[:3]
    stories = _write_json(tmp_path / "activation.json", {"annotation": [
        {"path": c["path"], "text": f"a long story {i}", "task": "audio_story_telling"} for i, c in enumerate(clips)]})
    c3 = micro_config(root, 3)
    c3.data.update(dict(train_json=stories, max_len=96))  # the story prompts are long
    stage3 = SalmonnTask(c3)
    assert [it["task"] for it in stage3._split("train")] == ["audio_story_telling"] * 3
    assert stage3._split("eval") == task._split("eval") and len(stage3._split("eval")) == EVAL_LIMIT
    ex = stage3.train_source()[2]
    assert stage3.tokenizer.decode(ex["labels"][ex["labels"] != IGNORE]) == "a long story 2"
    # An explicit task list wins.
    c = micro_config(root, 2)
    c.data.update(dict(tasks="audiocaption", eval_tasks="QA"))
    chosen = SalmonnTask(c)
    assert {it["task"] for it in chosen._split("train")} == {"audiocaption"}
    assert {it["task"] for it in chosen._split("eval")} == {"QA"}


# ---------------------------------------------------------------- loss, eval, metrics


def test_jitted_loss_fn(task, fresh):
    batch = _batch(task.train_source(), 2)
    loss, (metrics, extra) = jax.jit(task.loss_fn)(fresh, {}, batch, jax.random.PRNGKey(1))
    assert np.isfinite(loss) and 0.0 <= float(metrics["token_accuracy"]) <= 1.0 and extra == {}
    assert float(metrics["answer_tokens"]) == (batch["labels"] != IGNORE).sum()
    # A random LLM over a 512-token vocabulary: about log(512) nats per answer token.
    assert 4.0 < float(loss) < 9.0


def test_jitted_eval_step_metrics_and_table(task, fresh):
    source, items, tok = task.eval_source(), task._split("eval"), task.tokenizer
    batch = _batch(source, len(source))
    out = jax.device_get(jax.jit(task.eval_step)(fresh, {}, batch))
    assert out["tokens"].shape == (EVAL_LIMIT, NEW_TOKENS) and out["tokens"].dtype == np.int32
    for row in out["tokens"]:  # padding after the first EOS
        ends = np.flatnonzero(row == tok.eos_id)
        assert not len(ends) or (row[ends[0] + 1:] == tok.pad_id).all()
    np.testing.assert_array_equal(out["index"], np.arange(EVAL_LIMIT))
    np.testing.assert_array_equal(out["count"], (batch["labels"][:, 1:] != IGNORE).sum(1))
    assert out["nll"].shape == out["correct"].shape == (EVAL_LIMIT,) and (out["nll"] > 0).all()
    m = task.eval_metrics(out)
    assert m["loss"] == pytest.approx(out["nll"].sum() / out["count"].sum())
    assert 0.0 <= m["token_accuracy"] <= 1.0
    for name in {it["task"] for it in items}:
        metric = {"asr": "wer", "audiocaption": "bleu"}.get(name, "accuracy")
        assert f"{name}/{metric}" in m and m[f"{name}/n"] == sum(it["task"] == name for it in items)
    assert [p[0] for p in task.predictions(out)] == items
    text = task.format_results(m)
    assert text.startswith("SALMONN stage 2\ntask") and "answer tokens (teacher forced): loss" in text
    assert all(name in text for name in {it["task"] for it in items})


def test_metrics_of_the_true_answers(task):
    items, tok = task._split("eval"), task.tokenizer
    tokens = np.full((len(items), 64), tok.pad_id, np.int32)
    for i, item in enumerate(items):
        ids = tok.encode([item["text"]])[0] + [tok.eos_id, 5, 6]  # anything after EOS is ignored
        tokens[i, :len(ids)] = ids
    outputs = {"tokens": tokens, "index": np.arange(len(items)), "nll": np.ones(len(items)),
               "correct": np.ones(len(items)), "count": np.full(len(items), 4)}
    m = task.eval_metrics(outputs)
    expected = {"asr/wer": 0.0, "audiocaption/bleu": 100.0, "gender_recognition/accuracy": 1.0,
                "QA/accuracy": 1.0}
    assert {k: m[k] for k in expected if k in m} == pytest.approx({k: v for k, v in expected.items() if k in m})
    assert any(k in m for k in expected) and m["loss"] == 0.25 and m["token_accuracy"] == 0.25
    table = task.format_results(m)
    assert "100.00" in table and "accuracy 25.00%" in table


# ---------------------------------------------------------------- pretrained parts


def test_pretrained_parts_through_the_trainer(task, fresh, tmp_path):
    """Converted Whisper and LLM checkpoints fill params/whisper and params/llm (LoRA stays
    fresh); the rest keeps its initialisation."""
    from jaxaudio.train.loop import Trainer
    whisper = jax.tree.map(lambda x: np.asarray(x) + 0.5, fresh["whisper"])
    save_converted(str(tmp_path / "whisper"), {"params": whisper}, {"model": "whisper"})
    llm = {k: np.asarray(v) - 0.25 for k, v in flatten(fresh["llm"]).items() if "lora_" not in k}
    save_converted(str(tmp_path / "llm"), {"params": unflatten(llm)}, {"model": "llama"})
    cfg = micro_config(task.config.data.root)
    cfg.init.update(dict(whisper=str(tmp_path / "whisper"), llm=str(tmp_path / "llm")))
    assert SalmonnTask(cfg).pretrained_parts() == {"whisper": cfg.init.whisper, "llm": cfg.init.llm}
    got = flatten(jax.device_get(Trainer(cfg, str(tmp_path / "run")).state.params))
    want = {**flatten(fresh), **flatten({"whisper": whisper}), **{f"llm/{k}": v for k, v in llm.items()}}
    assert got.keys() == want.keys() and any("lora_a" in k for k in got)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    lora = [k for k in got if "/lora_" in k]
    assert lora and all(np.array_equal(got[k], flatten(fresh)[k]) for k in lora)

    # A missing part says how to make it; with a whole checkpoint the parts are not read.
    for part, hint in (("llm", "--source=vicuna-13b-v1.1"), ("beats", "--model=beats"),
                       ("whisper", "--source=whisper-large-v2")):
        c = micro_config(task.config.data.root)
        c.init[part] = str(tmp_path / "nope")
        with pytest.raises(FileNotFoundError, match=rf"config.init.{part}=.*nope does not exist. convert it first: "
                                                    rf"python -m launch.convert .*{hint}"):
            SalmonnTask(c).prepare_data()
    c.init.checkpoint = "workdir/stage1"
    assert SalmonnTask(c).pretrained_parts() == {}


# ---------------------------------------------------------------- bad inputs


def test_bad_annotations_and_audio(task, tmp_path):
    from jaxaudio.data.salmonn_data import AnnotationError
    root = task.config.data.root
    clip = sd.read_annotations(os.path.join(root, "train.json"))[0]["path"]
    bad = _write_json(tmp_path / "bad.json", {"annotation": [{"path": clip, "text": "a"}, {"path": clip}]})
    with pytest.raises(AnnotationError, match=r'bad.json: annotation\[1\] has no "text"'):
        SalmonnTask(official_config(root, train_json=bad)).train_source()
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), sd.SAMPLE_RATE)
    ann = _write_json(tmp_path / "empty.json", {"annotation": [
        {"path": clip, "text": "fine"}, {"path": str(tmp_path / "empty.wav"), "text": "no audio"}]})
    source = SalmonnTask(official_config(root, train_json=ann)).train_source()
    assert len(source) == 2 and source[0]["wave"].shape == (SAMPLES,)
    with pytest.raises(AudioError, match=r"annotation\[1\]: audio file .*empty.wav is empty"):
        source[1]
    missing = _write_json(tmp_path / "missing.json", {"annotation": [{"path": "gone.wav", "text": "x"}]})
    with pytest.raises(AudioError, match=r"cannot read audio file .*gone.wav"):
        SalmonnTask(official_config(root, train_json=missing)).train_source()[0]


def test_bad_prompts(task, tmp_path):
    from jaxaudio.data.salmonn_data import PromptError
    root = task.config.data.root
    train = {t: [sd.SPEECH_PREFIX + "Do it."] for t in sc.ALL_TASKS}
    no_audio = _write_json(tmp_path / "no_audio.json", {**train, "asr": ["Transcribe the speech."]})
    with pytest.raises(PromptError, match="a prompt of task 'asr' needs exactly one <SpeechHere>"):
        SalmonnTask(official_config(root, train_prompts=no_audio)).train_source()
    # The audio must come right after "USER: <Speech>" (one prefix array for the batch).
    moved = _write_json(tmp_path / "moved.json", {**train, "asr": ["Listen: <SpeechHere> transcribe it."],
                                                  "audiocaption": ["Listen: <SpeechHere> describe it."]})
    with pytest.raises(ValueError, match=r"a prompt of task '(asr|audiocaption)' puts 'USER: Listen: ' before "
                                         r"<SpeechHere>; every prompt must start with '<Speech><SpeechHere>"):
        SalmonnTask(official_config(root, train_prompts=moved)).train_source()
    c = official_config(root, max_prompt_len=3)
    with pytest.raises(ValueError, match=r"the test prompt of task '\w+' takes \d+ tokens after the audio > "
                                         r"config.data.max_prompt_len=3"):
        SalmonnTask(c).eval_source()[0]
    with pytest.raises(ValueError, match=r"max_prompt_len=3 \(evaluation item 0\)"):
        SalmonnTask(c).train_source()  # before the first training step, not at the first evaluation


def test_bad_tokenizer_and_missing_stage3_data(task, tmp_path):
    root = task.config.data.root
    c = official_config(root)
    c.model.llm.vocab_size = 256
    with pytest.raises(ValueError, match=r"tokenizer .*tokenizer.json has 512 tokens, more than "
                                         r"config.model.llm.vocab_size=256"):
        SalmonnTask(c).tokenizer
    c = micro_config(str(tmp_path / "nothing_here"))
    with pytest.raises(FileNotFoundError, match="no tokenizer at .*nothing_here/tokenizer.json: train a SALMONN stage"):
        SalmonnTask(c).tokenizer
    c = micro_config(root, 3)
    c.data.train_json = str(tmp_path / "activation.json")
    with pytest.raises(FileNotFoundError, match=r"config.data.train_json: .*activation.json does not exist "
                                                r"\(stage 3 trains on answers .* launch/infer.py --annotation\)"):
        SalmonnTask(c).train_source()
    c = official_config(root, train_json="")
    with pytest.raises(ValueError, match="config.data.train_json is required when config.data.generate is False"):
        SalmonnTask(c).train_source()
