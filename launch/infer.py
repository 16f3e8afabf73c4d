"""Ask a trained or converted model about audio: SALMONN (any audio, a free prompt) or BAT
(a binaural clip, a spatial question). The config's task decides.

    python -m launch.infer --config=configs/salmonn_tiny.py:2 --workdir=workdir/salmonn_tiny/stage2 \
        --audio=speech.wav --prompt="Transcribe the spoken words."
    python -m launch.infer --config=configs/salmonn_13b.py --checkpoint=converted/salmonn_13b \
        --audio=long_talk.wav --max_seconds=120 --lora_scale=2.0 --prompt="Write a story about the audio."
    # answers for every clip of an annotation file (activation data for SALMONN's stage 3)
    python -m launch.infer --config=configs/salmonn_tiny.py:2 --workdir=workdir/salmonn_tiny/stage2 \
        --annotation=data_cache/salmonn_tiny/train.json --task=audio_story_telling --lora_scale=2.0 \
        --limit=64 --output=workdir/salmonn_tiny/activation.json
    python -m launch.infer --config=configs/bat_tiny.py:3 --workdir=workdir/bat_tiny/stage3 \
        --audio=clip.wav --question="Where is the sound coming from, and how far away is it?"
    python -m launch.infer --config=configs/bat.py:3 --checkpoint=converted/bat \
        --audio=mono.wav --rir=binaural/scene/0.npy --question="..."
    python -m launch.infer --config=configs/audiobert_tiny.py:animal --workdir=workdir/audiobert_tiny/animal \
        --text="Kvip-kvip is the sound a [MASK] makes."

`--workdir` is a training run (its latest checkpoint); `--checkpoint` a converted model
(`launch/convert.py --model=salmonn|bat`), which carries its own sizes. The config gives
the tokenizer, the text limits and the decoding settings (`eval.num_beams`,
`eval.max_new_tokens`). SALMONN: the first channel of the file, padded to 1 s, read up
to --max_seconds (the config's `data.max_seconds`; more than 30 s -> several Whisper
windows); --lora_scale discounts the adapters (alpha / r = 4 in the original). BAT: a
2-channel file as it is, or a mono one rendered through --rir. AudioBERT: a sentence with a
[MASK]; prints the detected spans, the clips they retrieved and the filled sentence.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from jaxaudio.infer import InferError
from launch.common import parse_flags, setup_jax

_CONFIG = config_flags.DEFINE_config_file("config", None, "A SALMONN or BAT config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Or: a converted checkpoint.")
_AUDIO = flags.DEFINE_string("audio", None, "An audio file (BAT: binaural, or mono with --rir).")
_PROMPT = flags.DEFINE_string("prompt", None, "SALMONN: the instruction.")
_LORA_SCALE = flags.DEFINE_float("lora_scale", None, "SALMONN: LoRA scale (default alpha / r; lower = discounted).")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", None, "SALMONN: audio read (default config.data.max_seconds).")
_ANNOTATION = flags.DEFINE_string("annotation", None, "SALMONN: answer every clip of this annotation file ...")
_OUTPUT = flags.DEFINE_string("output", None, "... and write the answers here (an annotation file).")
_TASK = flags.DEFINE_string("task", "audio_story_telling", "SALMONN --annotation: the task (its test prompt is used "
                            "unless --prompt is given) written into the output.")
_LIMIT = flags.DEFINE_integer("limit", 0, "SALMONN --annotation: at most this many clips (0: all).")
_QUESTION = flags.DEFINE_string("question", None, "BAT: the question.")
_RIR = flags.DEFINE_string("rir", None, "BAT: a binaural room impulse response .npy [2, L] to render a mono --audio.")
_TEXT = flags.DEFINE_string("text", None, "AudioBERT: a sentence with a [MASK] to fill.")
flags.mark_flags_as_required(["config"])
_FLAGS_OF = {"salmonn": (_PROMPT, _LORA_SCALE, _MAX_SECONDS, _ANNOTATION, _OUTPUT, _TASK, _LIMIT),
             "bat": (_QUESTION, _RIR), "audiobert": (_TEXT,)}


def _salmonn() -> str:
    from jaxaudio.infer import salmonn
    if _ANNOTATION.value:
        if not _OUTPUT.value:
            raise app.UsageError("--annotation needs --output")
        n = salmonn.write_answers(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value, _ANNOTATION.value, _OUTPUT.value,
                                  task=_TASK.value, prompt=_PROMPT.value, lora_scale=_LORA_SCALE.value,
                                  limit=_LIMIT.value, batch_size=_CONFIG.value.train.eval_batch_size)
        return f"wrote {n} answers (task {_TASK.value}) to {_OUTPUT.value}"
    if not (_AUDIO.value and _PROMPT.value is not None):
        raise app.UsageError("SALMONN needs --audio and --prompt (or --annotation and --output)")
    text = salmonn.run(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value, _AUDIO.value, _PROMPT.value,
                       _LORA_SCALE.value, _MAX_SECONDS.value)
    return f"prompt: {_PROMPT.value.strip()}\nanswer: {text}"


def _bat() -> str:
    from jaxaudio.infer import bat
    if not (_AUDIO.value and _QUESTION.value is not None):
        raise app.UsageError("BAT needs --audio and --question")
    text = bat.run(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value, _AUDIO.value, _RIR.value, _QUESTION.value)
    return f"question: {_QUESTION.value.strip()}\nanswer: {text}"


def _audiobert() -> str:
    from jaxaudio.infer import audiobert
    if _TEXT.value is None:
        raise app.UsageError("AudioBERT needs --text (a sentence with a [MASK])")
    if not _WORKDIR.value:
        raise app.UsageError("AudioBERT answers from a training run: pass --workdir")
    return audiobert.format_result(audiobert.run(_CONFIG.value, _WORKDIR.value, _TEXT.value))


def main(argv):
    del argv
    if bool(_WORKDIR.value) == bool(_CHECKPOINT.value):
        raise app.UsageError("pass exactly one of --workdir or --checkpoint")
    runners = {"salmonn": _salmonn, "bat": _bat, "audiobert": _audiobert}
    task = _CONFIG.value.get("task")
    if task not in runners:
        raise app.UsageError(f"--config is a {task!r} config; launch.infer answers with {sorted(runners)} configs")
    # A flag of the other system would be ignored without a word; say so instead.
    foreign = [f"--{flag.name}" for other, own in _FLAGS_OF.items() if other != task for flag in own
               if flags.FLAGS[flag.name].present]
    if foreign:
        raise app.UsageError(f"{', '.join(foreign)}: not a flag for a {task} config (--config is {task}'s; "
                             f"its flags: {', '.join('--' + f.name for f in _FLAGS_OF[task])})")
    setup_jax(False)
    try:
        print(runners[task]())
    except InferError as e:
        sys.stderr.write(f"launch.infer: error: {e}\n")
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
