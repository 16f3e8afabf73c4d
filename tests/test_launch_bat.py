"""End to end: BAT's curriculum through the launchers on a micro config (generated data of
a handful of items, a random frozen encoder), evaluation's table, inference and its bad inputs."""
import os
import re

import numpy as np
import pytest

from configs import bat_tiny
from jaxaudio.convert.engine import flatten
from jaxaudio.convert.io import save_converted

from launch_util import override, run_module

MICRO = {
    "model.encoder.n_mels": 32, "model.encoder.target_frames": 32, "model.encoder.embed_dim": 32,
    "model.encoder.depth": 1, "model.encoder.num_heads": 2,
    "model.projector.num_queries": 4, "model.projector.hidden_size": 32, "model.projector.num_layers": 1,
    "model.projector.num_heads": 2, "model.projector.intermediate_size": 64,
    "model.llm.hidden_size": 32, "model.llm.intermediate_size": 64, "model.llm.num_hidden_layers": 1,
    "model.llm.num_attention_heads": 2, "model.llm.num_key_value_heads": 2,
    "data.num_train": 10, "data.num_eval": 5, "data.clip_seconds": 0.25, "data.num_workers": 1,
    "train.steps": 4, "train.batch_size": 2, "train.eval_batch_size": 2, "train.log_every": 2,
    "train.checkpoint_every": 4, "optim.warmup_steps": 1, "optim.total_steps": 4,
    "eval.num_beams": 2, "eval.max_new_tokens": 6, "init.encoder": "", "init.llm": "",
}
QUESTION = "Where is the sound coming from, and how far away is it?"


def _args(stage: int, data: str, **extra) -> list[str]:
    overrides = {**MICRO, "data.root": data, **extra}
    return [f"--config=configs/bat_tiny.py:{stage}"] + [f"--config.{k}={v}" for k, v in overrides.items()]


def _config(stage: int, data: str, **extra):
    return override(bat_tiny.get_config(str(stage)), {**MICRO, "data.root": data, **extra})


def _run(module, *args):
    return run_module(module, *args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Stage 1, then stage 2 from stage 1's workdir (another seed, so that a fresh init would differ)."""
    tmp = tmp_path_factory.mktemp("bat_e2e")
    data, stage1, stage2 = str(tmp / "data"), str(tmp / "stage1"), str(tmp / "stage2")
    proc = _run("launch.train", *_args(1, data, **{"train.eval_every": 0}), f"--workdir={stage1}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc2 = _run("launch.train", *_args(2, data, **{"train.eval_every": 4, "init.checkpoint": stage1, "seed": 1}),
                 f"--workdir={stage2}")
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    return data, stage1, stage2, proc2


def test_stage2_starts_from_stage1(runs):
    from jaxaudio.train.loop import load_run_variables
    data, stage1, stage2, proc = runs
    assert os.path.exists(os.path.join(data, "tokenizer.json"))
    first, second = flatten(load_run_variables(stage1)), flatten(load_run_variables(stage2))
    trainable = re.compile(bat_tiny.get_config().optim.trainable)
    frozen = [k for k in first if not (k.startswith("params/") and trainable.fullmatch(k.split("/", 1)[1]))]
    assert any(k.startswith("params/llm/") for k in frozen) and any(k.startswith("batch_stats/") for k in frozen)
    for k in frozen:  # frozen and loaded: unchanged by either stage
        np.testing.assert_array_equal(first[k], second[k])
    assert not np.array_equal(first["params/projector/query"], second["params/projector/query"])  # trained on
    assert "final eval:" in proc.stdout and "B/dir_acc" in proc.stdout


def test_evaluate_prints_the_table_with_chance(runs):
    data, _, stage2, _ = runs
    proc = _run("launch.evaluate", *_args(2, data), f"--workdir={stage2}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "BAT stage 2" in out and "chance (uniform)" in out and "chance (majority)" in out
    assert "DoA acc B | D" in out and "items per type: A=" in out


def test_infer_answers_a_question(runs):
    data, _, stage2, _ = runs
    proc = _run("launch.infer", *_args(2, data), f"--workdir={stage2}", f"--question={QUESTION}",
                f"--audio={data}/audio/eval_000001_1.wav", f"--rir={data}/reverb/binaural/eval_000001/1.npy")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"question: {QUESTION}" in proc.stdout and "answer:" in proc.stdout


def test_infer_bad_inputs(runs, tmp_path):
    """Each a clear one-line error (in process, and once through the launcher)."""
    from jaxaudio.data.audio import write_wav
    from jaxaudio.infer import InferError
    from jaxaudio.infer.bat import run
    data, stage1, stage2, _ = runs
    mono = f"{data}/audio/eval_000001_1.wav"
    stereo = str(tmp_path / "stereo.wav")
    write_wav(stereo, np.zeros((2, 8000), np.float32), 32000)
    cases = [
        (dict(audio=mono, question=QUESTION), r"has 1 channel\(s\); BAT hears binaural audio"),
        (dict(audio=stereo, question="  "), "--question is empty"),
        (dict(audio=stereo, question="where? " * 80), r"the question is too long: .*max_len=64 allows at most 63"),
    ]
    for kw, message in cases:
        with pytest.raises(InferError, match=message):
            run(_config(2, data), stage2, None, rir=None, **kw)
    other = str(tmp_path / "llama")
    save_converted(other, {"params": {"w": np.zeros(2, np.float32)}}, {"model": "llama", "kwargs": {}})
    with pytest.raises(InferError, match=r"--checkpoint=.*is not a converted BAT model \(model='llama'\)"):
        run(_config(2, data), None, other, stereo, None, QUESTION)
    bigger = _config(2, data, **{"model.llm.hidden_size": 64})
    with pytest.raises(InferError, match="does not hold this config's BAT model"):
        run(bigger, stage1, None, stereo, None, QUESTION)
    assert run(_config(2, data), stage2, None, stereo, None, QUESTION) is not None

    proc = _run("launch.infer", *_args(2, data), f"--workdir={stage2}", f"--question={QUESTION}", f"--audio={mono}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("launch.infer: error: --audio=")
