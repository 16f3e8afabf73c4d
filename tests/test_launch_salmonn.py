"""End to end: SALMONN's three stages through the launchers on a micro config (generated
data, random encoders and LLM): stage 1 -> stage 2 -> activation data written by
launch.infer -> stage 3; evaluation's table; inference on files of every shape and its bad
inputs; resuming; and the LoRA scale of inference checked against zeroed adapters."""
import functools
import json
import os
import re
import shutil

import numpy as np
import pytest
import soundfile as sf

from configs import salmonn_tiny
from jaxaudio.convert.engine import flatten, unflatten
from jaxaudio.data import salmonn_data as sd
from jaxaudio.data import salmonn_corpus as sc

from launch_util import override, run_module

SR = sd.SAMPLE_RATE
MICRO = {
    "model.whisper.d_model": 32, "model.whisper.encoder_layers": 1, "model.whisper.encoder_attention_heads": 2,
    "model.whisper.encoder_ffn_dim": 64, "model.whisper.max_source_positions": 100,
    "model.beats.embed_dim": 16, "model.beats.encoder_layers": 1, "model.beats.encoder_embed_dim": 32,
    "model.beats.encoder_ffn_embed_dim": 64, "model.beats.encoder_attention_heads": 2, "model.beats.conv_pos": 8,
    "model.beats.conv_pos_groups": 4,
    "model.connector.hidden_size": 32, "model.connector.num_layers": 1, "model.connector.num_heads": 2,
    "model.connector.intermediate_size": 64,
    "model.llm.hidden_size": 32, "model.llm.intermediate_size": 64, "model.llm.num_hidden_layers": 1,
    "model.llm.num_attention_heads": 2, "model.llm.num_key_value_heads": 2,
    "model.chunk_seconds": 2.0,
    "data.num_train": 24, "data.num_eval": 8, "data.num_workers": 1, "data.max_seconds": 2.0, "data.eval_limit": 4,
    "train.steps": 4, "train.batch_size": 2, "train.eval_batch_size": 4, "train.log_every": 2,
    "train.eval_every": 0, "train.checkpoint_every": 4, "train.data_threads": 1, "train.data_prefetch": 0,
    "optim.warmup_steps": 1, "optim.total_steps": 4, "eval.num_beams": 2, "eval.max_new_tokens": 6,
    "mesh.data": 1,
}
PROMPT = "Describe the sounds in this clip."
PROJ = "connector/window_qformer/speech_llama_proj/kernel"  # a trained parameter


def _overrides(data: str, extra: dict) -> dict:
    return {**MICRO, "data.root": data, **extra}


def _args(stage: int, data: str, **extra) -> list[str]:
    return [f"--config=configs/salmonn_tiny.py:{stage}"] + [
        f"--config.{k}={v}" for k, v in _overrides(data, extra).items()]


def _config(stage: int, data: str, **extra):
    return override(salmonn_tiny.get_config(str(stage)), _overrides(data, extra))


def _run(module, *args):
    return run_module(module, *args)


def _ok(proc) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _final_eval(stdout: str) -> dict[str, float]:
    line = next(x for x in stdout.splitlines() if x.startswith("final eval: "))
    return {k: float(v) for k, v in (kv.split("=") for kv in line[len("final eval: "):].split(", "))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Stage 1; stage 2 from it (another seed, so that a fresh init would differ); the
    stage-2 model's answers with a discounted LoRA as activation data; stage 3 on them."""
    tmp = tmp_path_factory.mktemp("salmonn_e2e")
    d = {name: str(tmp / name) for name in ("data", "stage1", "stage2", "stage3")}
    d["activation"] = str(tmp / "activation.json")
    out = {}
    out["stage1"] = _ok(_run("launch.train", *_args(1, d["data"]), f"--workdir={d['stage1']}"))
    out["stage2"] = _ok(_run("launch.train", *_args(2, d["data"], **{
        "init.checkpoint": d["stage1"], "seed": 1, "train.eval_every": 4}), f"--workdir={d['stage2']}"))
    out["infer"] = _ok(_run("launch.infer", *_args(2, d["data"]), f"--workdir={d['stage2']}",
                            f"--annotation={d['data']}/train.json", "--limit=4", "--lora_scale=1.0",
                            f"--output={d['activation']}"))
    out["stage3"] = _ok(_run("launch.train", *_args(3, d["data"], **{
        "init.checkpoint": d["stage2"], "data.train_json": d["activation"], "train.steps": 2,
        "train.eval_every": 2, "train.checkpoint_every": 2, "optim.total_steps": 2}), f"--workdir={d['stage3']}"))
    return d, out


@pytest.fixture(scope="module")
def clips(runs, tmp_path_factory):
    """2 s mono and stereo files (channel 0 = the mono clip), 0.5 s and 5 s mono files."""
    d, _ = runs
    tmp = tmp_path_factory.mktemp("clips")
    item = sd.read_annotations(os.path.join(d["data"], "eval.json"))[1]
    wave = sd.load_clip(item, max_seconds=None)
    long = np.resize(wave, 5 * SR)  # repeated: more than two 2 s chunks
    paths = {name: str(tmp / f"{name}.wav") for name in ("mono", "stereo", "short", "long")}
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 2 * SR).astype(np.float32)
    for name, x in (("mono", long[:2 * SR]), ("stereo", np.stack([long[:2 * SR], noise], 1)),
                    ("short", long[:SR // 2]), ("long", long)):
        sf.write(paths[name], x, SR, subtype="FLOAT")
    return paths


def _trainable(path: str) -> bool:
    return re.fullmatch(salmonn_tiny.get_config().optim.trainable, path) is not None


def test_stages_chain(runs):
    from jaxaudio.train.loop import load_run_variables
    d, out = runs
    assert os.path.exists(os.path.join(d["data"], "tokenizer.json"))
    first, second, third = (flatten(load_run_variables(d[s])["params"]) for s in ("stage1", "stage2", "stage3"))
    assert first.keys() == second.keys() == third.keys()
    frozen = [k for k in first if not _trainable(k)]
    assert {k.split("/")[0] for k in frozen} == {"whisper", "beats", "llm"}
    for k in frozen:  # frozen and loaded: unchanged by stages 2 and 3
        np.testing.assert_array_equal(first[k], second[k], err_msg=k)
        np.testing.assert_array_equal(second[k], third[k], err_msg=k)
    for a, b in ((first, second), (second, third)):  # trained on
        assert not np.array_equal(a[PROJ], b[PROJ])
    # Stage 2 evaluates its tasks; stage 3 is evaluated on stage 2's tasks too.
    here = set(sc.STAGES[2]) & set(sc.available_tasks())
    for stage in ("stage2", "stage3"):
        metrics = _final_eval(out[stage])
        assert {k.split("/")[0] for k in metrics if "/" in k} <= here and "loss" in metrics, metrics
        assert {k.split("/")[0] for k in metrics if "/" in k} >= {"audiocaption"}


def test_activation_data_in_the_original_layout(runs):
    d, out = runs
    assert f"wrote 4 answers (task audio_story_telling) to {d['activation']}" in out["infer"]
    with open(d["activation"], encoding="utf-8") as f:
        doc = json.load(f)
    assert list(doc) == ["annotation"] and len(doc["annotation"]) == 4
    source = sd.read_annotations(os.path.join(d["data"], "train.json"))[:4]
    for written, item in zip(doc["annotation"], source):
        assert set(written) == {"path", "text", "task"} and written["task"] == "audio_story_telling"
        assert os.path.isabs(written["path"]) and written["path"] == item["path"]
        assert isinstance(written["text"], str)
    assert sd.read_annotations(d["activation"])[0]["Q"] == ""  # readable as an annotation file


def test_evaluate_prints_the_per_task_table(runs):
    d, _ = runs
    out = _ok(_run("launch.evaluate", *_args(2, d["data"]), f"--workdir={d['stage2']}"))
    assert "SALMONN stage 2" in out and re.search(r"task\s+metric\s+%\s+n", out)
    assert re.search(r"audiocaption\s+bleu\s+[\d.]+\s+\d", out) and "answer tokens (teacher forced): loss" in out


def test_resume_continues_from_the_checkpoint(runs, tmp_path):
    from jaxaudio.train.loop import load_run_variables
    d, _ = runs
    workdir = str(tmp_path / "stage1")
    shutil.copytree(d["stage1"], workdir)
    _ok(_run("launch.train", *_args(1, d["data"], **{"train.steps": 6}), f"--workdir={workdir}"))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [r["step"] for r in map(json.loads, f) if r["split"] == "train"]
    assert steps == [2, 4, 6]  # steps 1-4 were not run again
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())[-1] == 6
    before, after = (flatten(load_run_variables(w)["params"]) for w in (d["stage1"], workdir))
    assert not np.array_equal(before[PROJ], after[PROJ])


def _answer(proc) -> str:
    out = _ok(proc)
    assert f"prompt: {PROMPT}\nanswer:" in out
    return out.split("answer:", 1)[1].strip()


def test_infer_answers_files_of_every_shape(runs, clips):
    """A prompt about a 2 s file; a stereo file (answered as its first channel); a clip
    shorter than 1 s (padded to 1 s); a 5 s one read in three 2 s chunks with --max_seconds."""
    from jaxaudio.infer.salmonn import Responder
    d, _ = runs
    common = [*_args(2, d["data"]), f"--workdir={d['stage2']}", f"--prompt={PROMPT}"]
    mono = _answer(_run("launch.infer", *common, f"--audio={clips['mono']}"))
    assert _answer(_run("launch.infer", *common, f"--audio={clips['stereo']}")) == mono
    _answer(_run("launch.infer", *common, f"--audio={clips['short']}"))
    _answer(_run("launch.infer", *common, f"--audio={clips['long']}", "--max_seconds=5"))
    # The answers of a barely trained model hardly depend on the audio, so check what the
    # model was given: the first channel, the 1 s minimum, the longer read.
    responder = Responder(_config(2, d["data"]), d["stage2"], None)
    first, both = responder.load(clips["mono"]), sf.read(clips["stereo"], dtype="float32")[0]
    np.testing.assert_array_equal(responder.load(clips["stereo"]), first)
    np.testing.assert_array_equal(first, both[:, 0])
    assert not np.allclose(first, both.mean(1), atol=1e-3)
    short = responder.load(clips["short"])
    assert short.shape == (SR,) and short[SR // 2:].max() == short[SR // 2:].min() == 0
    long = Responder(_config(2, d["data"]), d["stage2"], None, max_seconds=5).load(clips["long"])
    assert long.shape == (5 * SR,) and responder.module.num_chunks(len(long)) == 3
    assert responder.load(clips["long"]).shape == (2 * SR,)  # without it: data.max_seconds


def test_infer_bad_inputs(runs, clips, tmp_path):
    """Each a one-line error from the launcher, no traceback."""
    d, _ = runs
    cases = [
        ([*_args(2, d["data"]), f"--workdir={d['stage2']}", f"--audio={clips['mono']}", "--prompt=  "],
         "launch.infer: error: --prompt is empty"),
        ([*_args(2, d["data"]), f"--workdir={d['stage2']}", f"--audio={tmp_path}/gone.wav", f"--prompt={PROMPT}"],
         f"launch.infer: error: cannot read audio file {tmp_path}/gone.wav"),
        ([*_args(2, d["data"], **{"model.llm.hidden_size": 64}), f"--workdir={d['stage1']}",
          f"--audio={clips['mono']}", f"--prompt={PROMPT}"],
         f"launch.infer: error: --workdir={d['stage1']} does not hold this config's SALMONN model"),
        (["--config=configs/bat_tiny.py:2", f"--workdir={d['stage2']}", f"--audio={clips['mono']}"],
         "BAT needs --audio and --question"),
        (["--config=configs/bat_tiny.py:2", f"--workdir={d['stage2']}", f"--audio={clips['mono']}",
          "--question=Where?", f"--prompt={PROMPT}", "--lora_scale=2"],
         "--prompt, --lora_scale: not a flag for a bat config"),
    ]
    for args, message in cases:
        proc = _run("launch.infer", *args)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-1000:]


def test_lora_scale_zero_equals_zeroed_adapters(runs, clips, tmp_path):
    """`run(..., lora_scale=0)` answers as a model whose adapters are zero, while the default
    scale (alpha / r) with large adapters answers differently: the flag reaches the LLM."""
    from jaxaudio.convert.io import save_converted
    from jaxaudio.infer import InferError
    from jaxaudio.infer.salmonn import run
    from jaxaudio.tasks.audio_llm import model_kwargs
    from jaxaudio.tasks.salmonn import PARTS, SCALARS
    from jaxaudio.train.loop import load_run_variables
    d, _ = runs
    cfg = functools.partial(_config, 2, d["data"])
    params = flatten(load_run_variables(d["stage2"])["params"])
    rng = np.random.default_rng(0)
    loud = {k: (rng.normal(0.0, 1.0, v.shape).astype(v.dtype) if "/lora_" in k else v) for k, v in params.items()}
    zero = {k: (np.zeros_like(v) if "/lora_b" in k else v) for k, v in loud.items()}
    kwargs = model_kwargs(cfg().model, PARTS, SCALARS)
    for name, flat in (("loud", loud), ("zero", zero)):
        save_converted(str(tmp_path / name), {"params": unflatten(flat)}, {"model": "salmonn", "kwargs": kwargs})
    answers = {(name, scale): run(cfg(), None, str(tmp_path / name), clips["mono"], PROMPT, lora_scale=scale)
               for name, scale in (("loud", 0.0), ("zero", None), ("loud", None))}
    assert answers["loud", 0.0] == answers["zero", None]
    assert answers["loud", None] != answers["zero", None], answers
    with pytest.raises(InferError, match="--config is a 'bat' config; this needs a SALMONN config"):
        from configs import bat_tiny
        run(bat_tiny.get_config("2"), d["stage2"], None, clips["mono"], PROMPT)
