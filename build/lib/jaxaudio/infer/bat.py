"""Answering a question about a binaural clip with a trained or converted BAT.

A 2-channel file is used as it is (resampled to 32 kHz, cut or padded to the clip length);
a mono one needs a binaural room response: RMS-normalised to -14 dBFS, convolved and
cropped like the official SpatialSoundQA data.
"""
from jaxaudio.infer import InferError, load_model


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
    from jaxaudio.convert.bat import load_bat
    module, variables = load_model(task, workdir, checkpoint, load_bat)
    encoder = module.parts()[0]
    rir_seconds = config.data.rir_seconds or None
    wave = load_wave(audio, rir, config.data.clip_seconds, rir_seconds, encoder.sample_rate)
    out = answer(module, variables, jnp.asarray(wave)[None], [prompt], bos_token_id=tokenizer.bos_id,
                 eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, num_beams=config.eval.num_beams,
                 max_new_tokens=config.eval.max_new_tokens)
    return tokenizer.decode(out.tokens[0])
