"""The BAT task: tokenizer, examples, stage filtering, encoder init, jitted decoding, metrics."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bat, bat_tiny
from jaxaudio.convert.engine import flatten, unflatten
from jaxaudio.convert.io import save_converted
from jaxaudio.data import spatial_qa as sqa
from jaxaudio.models.audio_llm import IGNORE
from jaxaudio.models.bat import PROMPT, answer
from jaxaudio.tasks import get_task
from jaxaudio.tasks.bat import BatTask, model_kwargs, stage_filter

MAX_LEN = 64


def micro_config(root: str, stage: int = 1):
    """bat_tiny with every part shrunk, generated data of 10 + 5 quarter-second items."""
    c = bat_tiny.get_config(str(stage))
    c.model.encoder.update(dict(n_mels=32, target_frames=32, patch_size=8, embed_dim=32, depth=1, num_heads=2))
    c.model.projector.update(dict(num_queries=4, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    c.model.llm.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=2))
    c.data.update(dict(root=root, num_train=10, num_eval=5, clip_seconds=0.25, num_workers=1, max_len=MAX_LEN))
    c.train.update(dict(batch_size=2, eval_batch_size=5))
    c.eval.update(dict(num_beams=2, max_new_tokens=6))
    c.init.update(dict(checkpoint="", encoder="", llm=""))
    c.mesh.update(dict(data=1))
    return c


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    t = BatTask(micro_config(str(tmp_path_factory.mktemp("bat_data")), stage=3))
    t.prepare_data()
    return t


@pytest.fixture(scope="module")
def variables(task):
    return task.init_variables(jax.random.PRNGKey(0))


def test_registry_configs_and_bad_fields():
    assert get_task("bat") is BatTask
    for stage in (1, 2, 3):
        c = bat.get_config(str(stage))
        assert c.stage == stage and c.init.checkpoint == ("" if stage == 1 else f"workdir/bat/stage{stage - 1}")
        kw = model_kwargs(c.model)
        assert kw["llm"]["hidden_size"] == 4096 and kw["projector"]["num_queries"] == 64
        assert kw["lora"] == {"targets": r"llm/layers_\d+/attn/(query|value)", "rank": 8, "alpha": 32.0,
                              "dropout": 0.05}
    assert bat_tiny.get_config("2").init.checkpoint == "workdir/bat_tiny/stage1"
    with pytest.raises(ValueError, match="stage is 1, 2 or 3"):
        bat.get_config("4")
    c = bat_tiny.get_config()
    c.model.llm.hidden_sise = 3
    with pytest.raises(ValueError, match=r"config.model.llm: unknown Llama fields \['hidden_sise'\]"):
        model_kwargs(c.model)


def test_original_size_trains_the_released_parameter_count():
    """configs/bat.py (abstractly): `optim.trainable` picks the 73.56 M parameters of BAT's
    `model.pt` (Q-Former 66.21 M + projection 3.16 M + LoRA 4.19 M); LLaMA-2 7B and the
    Spatial-AST stay frozen."""
    import re

    import flax.linen as nn
    c = bat.get_config()
    c.init.update(dict(encoder="", llm=""))
    params = flatten(nn.unbox(jax.eval_shape(BatTask(c).init_variables, jax.random.PRNGKey(0)))["params"])
    trainable = re.compile(c.optim.trainable)
    count = sum(int(np.prod(v.shape)) for k, v in params.items() if trainable.fullmatch(k))
    assert count == 73_561_600
    llm = sum(int(np.prod(v.shape)) for k, v in params.items() if k.startswith("llm/") and "lora_" not in k)
    assert llm == 6_738_415_616


def test_tokenizer_is_trained_once_and_reused(task):
    path = task.tokenizer_path
    assert path == os.path.join(task.config.data.root, "tokenizer.json")
    before = os.stat(path).st_mtime_ns
    task.prepare_data()
    assert os.stat(path).st_mtime_ns == before  # same data and vocabulary: not retrained
    tok = task.tokenizer
    assert (tok.tok.token_to_id("<unk>"), tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.vocab_size <= task.config.model.llm.vocab_size
    text = PROMPT.format(question="Where is the sound of the bell, 2.5m away? (ünïcode too)")
    ids = tok.encode([text])[0]
    assert tok.decode(ids) == text.strip() and tok.decode(ids + [tok.eos_id, 7, 8]) == text.strip()
    # The template is frequent in the training text, so BPE merges it into few tokens.
    assert len(tok.encode([PROMPT.format(question="")])[0]) < len(PROMPT) / 3


def test_examples_shapes_and_labels_on_answer_and_eos(task):
    source = task.train_source()
    records = task._split("train")[0]
    tok = task.tokenizer
    for i in range(len(source)):
        ex = source[i]
        assert ex["wave"].shape == (2, task.samples) and ex["wave"].dtype == np.float32
        for k in ("input_ids", "attention_mask", "labels"):
            assert ex[k].shape == (MAX_LEN,) and ex[k].dtype == np.int32
        labeled = np.flatnonzero(ex["labels"] != IGNORE)
        np.testing.assert_array_equal(ex["labels"][labeled], ex["input_ids"][labeled])
        prompt = tok.encode([PROMPT.format(question=records[i]["question"])])[0]
        assert labeled[0] == 1 + len(prompt)  # BOS and the prompt carry no loss
        assert ex["input_ids"][labeled[-1]] == tok.eos_id and labeled[-1] == ex["attention_mask"].sum() - 1
        assert tok.decode(ex["input_ids"][labeled]) == records[i]["answer"]
        assert int(ex["index"]) == i
    ev = task.eval_source()[0]
    n = int(ev["prompt_len"])
    np.testing.assert_array_equal(ev["prompt_ids"][-n:], ev["input_ids"][:n])
    assert (ev["prompt_ids"][:-n] == tok.pad_id).all()


def test_official_layout_takes_the_same_path(task):
    """`data.generate=False` with the official files (here the generated ones, which are in
    the official layout) and a tokenizer path gives the same examples."""
    root = task.config.data.root
    cfg = micro_config(root, stage=3)
    cfg.data.update(dict(generate=False, root="/nonexistent", tokenizer=os.path.join(root, "tokenizer.json"),
                         train_json=os.path.join(root, "train.json"), eval_json=os.path.join(root, "eval.json"),
                         train_reverb_json=os.path.join(root, "reverb", "train_reverberation.json"),
                         eval_reverb_json=os.path.join(root, "reverb", "eval_reverberation.json"),
                         audio_root=os.path.join(root, "audio"), reverb_root=os.path.join(root, "reverb")))
    official = BatTask(cfg)
    official.prepare_data()  # nothing to generate
    for i in (0, 3):
        a, b = official.train_source()[i], task.train_source()[i]
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    cfg.data.audio_root = ""
    with pytest.raises(ValueError, match="config.data.audio_root is required"):
        BatTask(cfg).train_source()


def test_stage_filtering(task):
    items = task._split("train")[1]
    letters = {sqa.TYPE_LETTER[it["question_type"]] for it in items}
    assert letters == set("ABCDE")
    for stage in (1, 2):
        kept = [items[i] for i in stage_filter(items, stage)]
        assert {sqa.TYPE_LETTER[it["question_type"]] for it in kept} == set(sqa.STAGES[stage])
    stage1 = BatTask(micro_config(task.config.data.root, stage=1))
    assert {sqa.TYPE_LETTER[it["question_type"]] for it in stage1._split("train")[1]} == {"A", "B"}
    assert len(stage1.train_source()) == 4 and len(stage1.eval_source()) == 2  # letters take turns
    with pytest.raises(ValueError, match="config.stage=7"):
        stage_filter(items, 7)


def test_init_variables_lora_and_shapes(task, variables):
    import flax.linen as nn
    flat = flatten(nn.unbox(variables))
    assert any(k.endswith("llm/layers_0/attn/query/lora_a") for k in flat)
    assert {"params", "batch_stats"} == set(variables)
    b = task.dummy_batch(2)
    logits = jax.jit(lambda v, w, i: task.model.apply(v, w, i))(nn.unbox(variables), b["wave"], b["input_ids"])
    assert logits.shape == (2, 4 + MAX_LEN, 512)


def _initial_variables(cfg, workdir) -> dict:
    """The variables a run starts from: init, then the parts the trainer loads."""
    from jaxaudio.train.loop import Trainer
    trainer = Trainer(cfg, str(workdir))
    return jax.device_get({"params": trainer.state.params, **trainer.state.extra})


def test_encoder_from_a_spatial_ast_checkpoint(task, variables, tmp_path):
    """`config.init.encoder` fills params/encoder + batch_stats/encoder; a misfit names the
    keys; a missing path says to run the Spatial-AST job."""
    import flax.linen as nn
    enc = jax.tree.map(lambda x: np.asarray(x) + 1.0, nn.unbox({c: variables[c]["encoder"] for c in variables}))
    save_converted(str(tmp_path / "enc"), enc, {"model": "spatial_ast"})
    cfg = micro_config(task.config.data.root)
    cfg.init.encoder = str(tmp_path / "enc")
    got = _initial_variables(cfg, tmp_path / "run1")
    for k, v in flatten(enc).items():
        c, rest = k.split("/", 1)
        np.testing.assert_array_equal(flatten(got[c]["encoder"])[rest], v)
    bad = dict(enc, params={k: v for k, v in enc["params"].items() if k != "cls_tokens"})
    save_converted(str(tmp_path / "bad"), bad, {})
    cfg.init.encoder = str(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"does not fit config.model.encoder:\n  missing params/cls_tokens"):
        _initial_variables(cfg, tmp_path / "run2")
    # A converted LLM fills params/llm; the adapters start fresh.
    llm = jax.tree.map(lambda x: np.asarray(x) - 1.0, nn.unbox(variables["params"]["llm"]))
    base = {k: v for k, v in flatten(llm).items() if "lora_" not in k}
    save_converted(str(tmp_path / "llm"), {"params": unflatten(base)}, {"model": "llama"})
    cfg.init.update(dict(encoder="", llm=str(tmp_path / "llm")))
    got = flatten(_initial_variables(cfg, tmp_path / "run3")["params"]["llm"])
    for k, v in flatten(llm).items():
        if "lora_" in k:
            np.testing.assert_array_equal(got[k], flatten(nn.unbox(variables["params"]["llm"]))[k])
        else:
            np.testing.assert_array_equal(got[k], v)
    cfg.init.llm = ""
    cfg.init.encoder = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="run its main job first"):
        BatTask(cfg).prepare_data()
    cfg.init.checkpoint = "somewhere"  # a whole checkpoint provides the encoder: init.encoder is not read
    assert BatTask(cfg)._part_sources() == {}


def test_loss_fn(task, variables):
    import flax.linen as nn
    params, extra = nn.unbox(variables["params"]), {"batch_stats": nn.unbox(variables["batch_stats"])}
    batch = {k: np.stack([task.train_source()[i][k] for i in range(2)]) for k in task.train_source()[0]}
    loss, (metrics, new_extra) = jax.jit(task.loss_fn)(params, extra, batch, jax.random.PRNGKey(1))
    assert np.isfinite(loss) and 0.0 <= metrics["token_accuracy"] <= 1.0
    assert metrics["answer_tokens"] == (batch["labels"][:, 1:] != IGNORE).sum()
    jax.tree.map(np.testing.assert_array_equal, new_extra, extra)  # the encoder's statistics stay


def test_jitted_eval_step_decodes_like_answer(task, variables):
    """The eval step's in-jit decoding gives `models.bat.answer`'s tokens; the metrics
    read them back as text."""
    import flax.linen as nn
    v = nn.unbox(variables)
    # Non-zero adapters, so that decoding through LoRA is exercised.
    flat = flatten(v["params"])
    v["params"] = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.5 if "lora_b" in jax.tree_util.keystr(p) else x, v["params"])
    assert any("lora_b" in k for k in flat)
    source = task.eval_source()
    batch = {k: np.stack([source[i][k] for i in range(len(source))]) for k in source[0]}
    out = jax.jit(task.eval_step)(v["params"], {"batch_stats": v["batch_stats"]}, batch)
    tok, records = task.tokenizer, task._split("eval")[0]
    prompts = [tok.encode([PROMPT.format(question=r["question"])])[0] for r in records]
    ref = answer(task.model, v, jnp.asarray(batch["wave"]), prompts, bos_token_id=tok.bos_id,
                 eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, num_beams=2, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(out["tokens"]), np.asarray(ref.tokens))
    assert out["nll"].shape == out["count"].shape == (len(source),)
    m = task.eval_metrics(jax.device_get(out))
    assert 0.0 <= m["token_accuracy"] <= 1.0 and m["loss"] > 0


def test_metrics_of_true_answers_and_table(task):
    """The reference answers, decoded from their tokens, score perfectly; the table has
    the chance rows."""
    items = task._split("eval")[1]
    tok = task.tokenizer
    tokens = np.full((len(items), 24), tok.pad_id, np.int32)
    for i, item in enumerate(items):
        ids = tok.encode([item["answer"]])[0] + [tok.eos_id]
        tokens[i, :len(ids)] = ids
    outputs = {"tokens": tokens, "index": np.arange(len(items)), "nll": np.ones(len(items)),
               "correct": np.ones(len(items)), "count": np.full(len(items), 2)}
    m = task.eval_metrics(outputs)
    assert m["A/f1"] == m["B/dir_acc"] == 1.0 and m["B/der"] == 0.0 and m["loss"] == 0.5
    assert m["chance_B/dir_acc"] == 0.125 and "chance_majority/B/dir_acc" in m
    text = task.format_results(m)
    assert "BAT stage 3" in text and "chance (uniform)" in text and "chance (majority)" in text
    assert "100.00" in text and "items per type: A=1, B=1, C=1, D=1, E=1" in text
