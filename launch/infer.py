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

from launch.common import parse_flags, setup_jax

_CONFIG = config_flags.DEFINE_config_file("config", None, "A BAT config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A BAT training run's workdir.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Or: a converted BAT checkpoint.")
_AUDIO = flags.DEFINE_string("audio", None, "A binaural (2-channel) audio file, or a mono one with --rir.")
_RIR = flags.DEFINE_string("rir", None, "A binaural room impulse response .npy [2, L] to render a mono --audio.")
_QUESTION = flags.DEFINE_string("question", None, "The question.")
flags.mark_flags_as_required(["config", "audio", "question"])


class InferError(Exception):
    """A bad input; reported as one line."""


def load_wave(audio: str, rir: str | None, clip_seconds: float, rir_seconds: float | None, sample_rate: int):
    """`[2, clip samples]` float32 from a binaural file, or a mono one rendered through `rir`."""
    import numpy as np

    from jaxaudio.data import audio as audio_lib
    from jaxaudio.data import spatialsoundqa as ssqa
    samples = int(round(clip_seconds * sample_rate))
    try:
        if rir:
            mono = ssqa.load_mono_clip(audio, clip_seconds, sample_rate)  # the first channel, as the originals
            return ssqa.render_binaural(mono, ssqa.load_rir(rir, rir_seconds, sample_rate))
        wave = audio_lib.load_audio(audio, sample_rate)
    except (audio_lib.AudioError, ValueError, OSError) as e:
        raise InferError(str(e).splitlines()[0]) from None
    if wave.shape[0] != 2:
        raise InferError(f"--audio={audio} has {wave.shape[0]} channel(s); BAT hears binaural audio: give a "
                         "2-channel file, or a mono one with --rir=BRIR.npy to render it")
    return audio_lib.fit_length(wave, samples).astype(np.float32)


def load_model(task, workdir: str | None, checkpoint: str | None):
    """`(module, variables)` of a BAT run's latest checkpoint or of a converted BAT."""
    import flax.linen as nn
    import jax

    from jaxaudio.convert.engine import ConversionError, flatten
    if checkpoint:
        from jaxaudio.convert.bat import load_bat
        try:
            return load_bat(checkpoint)
        except (ConversionError, OSError, ValueError) as e:
            raise InferError(f"--checkpoint={checkpoint}: {str(e).splitlines()[0]}") from None
    from jaxaudio.train.loop import load_run_variables
    try:
        variables = load_run_variables(workdir)
    except (ValueError, OSError) as e:
        raise InferError(f"--workdir={workdir}: {str(e).splitlines()[0]}") from None
    want = {k: tuple(v.shape) for k, v in flatten(nn.unbox(jax.eval_shape(
        task.init_variables, jax.random.PRNGKey(0)))).items()}
    have = {k: tuple(v.shape) for k, v in flatten(variables).items()}
    if want != have:
        differ = sorted(set(want.items()) ^ set(have.items()))
        raise InferError(f"--workdir={workdir} does not hold this config's BAT model ({len(differ)} variables differ, "
                         f"e.g. {differ[0][0]}); is it a run of another model or size?")
    return task.model, variables


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


def run(config, workdir: str | None, checkpoint: str | None, audio: str, rir: str | None, question: str) -> str:
    """The answer text (raises `InferError` on bad input)."""
    import jax.numpy as jnp

    from jaxaudio.models.bat import PROMPT, answer
    from jaxaudio.tasks import get_task
    if config.get("task") != "bat":
        raise InferError(f"--config is a {config.get('task')!r} config; launch.infer answers with BAT configs")
    question = (question or "").strip()
    if not question:
        raise InferError("--question is empty")
    with config.unlocked():
        config.init.checkpoint, config.init.encoder, config.init.llm = "", "", ""  # the weights come from the flags
    task = get_task("bat")(config)
    try:
        tokenizer = task.tokenizer
    except (OSError, ValueError) as e:
        raise InferError(str(e)) from None
    prompt = tokenizer.encode([PROMPT.format(question=question)])[0]
    max_len = config.data.max_len
    if 1 + len(prompt) >= max_len:
        raise InferError(f"the question is too long: BOS + prompt take {1 + len(prompt)} tokens, but "
                         f"config.data.max_len={max_len} allows at most {max_len - 1} (the answer needs one)")
    module, variables = load_model(task, workdir, checkpoint)
    encoder = module.parts()[0]
    rir_seconds = config.data.rir_seconds or None
    wave = load_wave(audio, rir, config.data.clip_seconds, rir_seconds, encoder.sample_rate)
    out = answer(module, variables, jnp.asarray(wave)[None], [prompt], bos_token_id=tokenizer.bos_id,
                 eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, num_beams=config.eval.num_beams,
                 max_new_tokens=config.eval.max_new_tokens)
    return tokenizer.decode(out.tokens[0])


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
