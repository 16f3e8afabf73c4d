"""Ask a trained BAT a question about a binaural clip.

    python -m launch.infer --config=configs/bat_tiny.py:3 --workdir=workdir/bat_tiny/stage3 \
        --audio=clip.wav --question="Where is the sound coming from, and how far away is it?"
    # a mono clip rendered through a binaural room response, as the official data is
    python -m launch.infer --config=configs/bat.py:3 --checkpoint=converted/bat \
        --audio=mono.wav --rir=binaural/scene/0.npy --question="..."

`--workdir` is a BAT training run (its latest checkpoint); `--checkpoint` a converted BAT
(`launch/convert.py --model=bat`), which carries its own sizes. The config gives the
tokenizer, the text length limit (`data.max_len`), the clip length and the decoding
settings (`eval.num_beams`, `eval.max_new_tokens`). A 2-channel file is used as it is
(resampled to 32 kHz, cut or padded to the clip length); a mono one needs `--rir`:
RMS-normalised to -14 dBFS, convolved and cropped like the official data.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from jaxaudio.infer import InferError, run
from launch.common import parse_flags, setup_jax

_CONFIG = config_flags.DEFINE_config_file("config", None, "A BAT config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A BAT training run's workdir.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Or: a converted BAT checkpoint.")
_AUDIO = flags.DEFINE_string("audio", None, "A binaural (2-channel) audio file, or a mono one with --rir.")
_RIR = flags.DEFINE_string("rir", None, "A binaural room impulse response .npy [2, L] to render a mono --audio.")
_QUESTION = flags.DEFINE_string("question", None, "The question.")
flags.mark_flags_as_required(["config", "audio", "question"])


def main(argv):
    del argv
    if bool(_WORKDIR.value) == bool(_CHECKPOINT.value):
        raise app.UsageError("pass exactly one of --workdir or --checkpoint")
    setup_jax(False)
    try:
        text = run(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value, _AUDIO.value, _RIR.value, _QUESTION.value)
    except InferError as e:
        sys.stderr.write(f"launch.infer: error: {e}\n")
        sys.exit(1)
    print(f"question: {_QUESTION.value.strip()}\nanswer: {text}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
