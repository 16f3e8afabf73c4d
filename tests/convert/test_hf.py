"""The Hugging Face conversion path shared by every model: config.json, model detection,
bad directories, and the launcher without `--config`. Each model's parity lives in
`tests/models/test_<model>.py`."""
import json
import os
import subprocess
import sys

import pytest

from jaxaudio.convert import ConversionError, save_converted
from jaxaudio.convert.hf import HF_MODELS, convert_hf, detect_model, hf_field, hf_module, load_pretrained, read_hf_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_registered_converter_has_the_interface():
    for name in HF_MODELS:
        mod = hf_module(name)
        for attr in ("HF_MODEL_TYPES", "config_from_hf", "build", "key_map"):
            assert hasattr(mod, attr), f"jaxaudio.convert.{name} lacks {attr}"


@pytest.mark.parametrize("model_type, name", [("llama", "llama"), ("bert", "bert"), ("whisper", "whisper"),
                                              ("audio-spectrogram-transformer", "ast"),
                                              ("blip_2_qformer", "qformer")])
def test_model_type_picks_the_converter(model_type, name):
    assert detect_model({"model_type": model_type}, "src") == name


def test_unknown_model_type_names_it_and_the_flag():
    with pytest.raises(ConversionError, match=r"model_type='gpt2'.*--model"):
        detect_model({"model_type": "gpt2"}, "src")


def test_directory_without_config_json(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        read_hf_config(str(tmp_path))


def test_config_json_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ConversionError, match="config.json: not valid JSON"):
        read_hf_config(str(tmp_path))


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConversionError, match="no weights file found|field"):
        convert_hf(str(tmp_path))


def test_missing_field_is_named():
    with pytest.raises(ConversionError, match="field 'hidden_size' is missing"):
        hf_field({"model_type": "bert"}, "hidden_size")


def test_unknown_model_name_and_dtype(tmp_path):
    with pytest.raises(ConversionError, match="no Hugging Face converter"):
        hf_module("gpt2")
    with pytest.raises(ConversionError, match="dtype='float16'"):
        convert_hf(str(tmp_path), "bert", dtype="float16")


def test_load_pretrained_refuses_other_checkpoints(tmp_path):
    save_converted(str(tmp_path), {"params": {"w": __import__("numpy").zeros(2)}}, {"embed_dim": 3})
    with pytest.raises(ConversionError, match="not a converted Hugging Face model"):
        load_pretrained(str(tmp_path))


def test_launcher_hf_path_errors_are_one_line(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "launch.convert", f"--source={tmp_path}", f"--output={tmp_path}/o"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "no config.json" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
