"""Prompting a trained or converted SALMONN about audio files, and writing activation data.

A clip is read as the original reads it (first channel, zero-padded to 1 s) and kept up
to `max_seconds` (the config's `data.max_seconds` unless given): beyond one Whisper
window (30 s) the model reads it in several windows. The prompt is the original's
`USER: <Speech><SpeechHere></Speech> {prompt}\\nASSISTANT:`. Decoding follows
`config.eval` (beam 4, 200 new tokens in the original's configs); `lora_scale` discounts
the adapters, which is how activation data is written (`write_answers`).
"""
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxaudio.infer import InferError, load_model


def _answer_fn():
    from jaxaudio.models.salmonn import answer

    @functools.partial(jax.jit, static_argnames=("module", "eos", "pad", "num_beams", "max_new_tokens"))
    def fn(module, variables, wave, length, prefix, prompt, mask, lora_scale, *, eos, pad, num_beams,
           max_new_tokens):
        return answer(module, variables, wave, length, prefix, prompt, mask, eos_token_id=eos, pad_token_id=pad,
                      num_beams=num_beams, max_new_tokens=max_new_tokens, lora_scale=lora_scale).tokens
    return fn


class Responder:
    """A loaded SALMONN, its tokenizer and decoding settings."""

    def __init__(self, config, workdir: str | None, checkpoint: str | None, lora_scale: float | None = None,
                 max_seconds: float | None = None):
        from jaxaudio.convert.salmonn import load_salmonn
        from jaxaudio.tasks import get_task
        from jaxaudio.tasks.salmonn import prefix_ids
        if config.get("task") != "salmonn":
            raise InferError(f"--config is a {config.get('task')!r} config; this needs a SALMONN config")
        with config.unlocked():  # the weights come from the flags
            config.init.checkpoint = ""
            config.init.whisper = config.init.beats = config.init.llm = ""
        self.task = get_task("salmonn")(config)
        try:
            self.tokenizer = self.task.tokenizer
        except (OSError, ValueError) as e:
            raise InferError(str(e)) from None
        self.module, self.variables = load_model(self.task, workdir, checkpoint, load_salmonn)
        self.prefix = prefix_ids(self.tokenizer)
        self.max_seconds = float(max_seconds or config.data.max_seconds)
        lora = self.module.lora_config()
        scale = lora_scale if lora_scale is not None else config.eval.get("lora_scale")
        self.lora_scale = jnp.float32(scale if scale is not None else (lora.scale if lora else 0.0))
        self.eval = config.eval
        self._fn = _answer_fn()

    def load(self, clip: str | dict, index: int | None = None) -> np.ndarray:
        """A file path, or an annotation item (its `expand_wav` clips appended)."""
        from jaxaudio.data import salmonn_data as sd
        from jaxaudio.data.audio import AudioError
        try:
            return sd.load_clip({"path": clip} if isinstance(clip, str) else clip, max_seconds=self.max_seconds,
                                index=index)
        except (AudioError, OSError, ValueError) as e:
            raise InferError(str(e).splitlines()[0]) from None

    def respond(self, waves: Sequence[np.ndarray], prompts: Sequence[str]) -> list[str]:
        """One answer per `(wave, full prompt)`; a batch is padded to its longest clip."""
        from jaxaudio.data import salmonn_data as sd
        from jaxaudio.models.audio_llm import left_pad
        afters = []
        for p in prompts:
            try:
                afters.append(self.tokenizer.encode([sd.split_prompt(p)[1]])[0])
            except ValueError as e:
                raise InferError(str(e)) from None
        samples = max(len(w) for w in waves)
        wave = np.zeros((len(waves), samples), np.float32)
        for i, w in enumerate(waves):
            wave[i, :len(w)] = w
        ids, mask = left_pad(afters, self.tokenizer.pad_id)
        prefix = np.broadcast_to(self.prefix, (len(waves), len(self.prefix)))
        tokens = self._fn(self.module, self.variables, wave, np.asarray([len(w) for w in waves], np.int32),
                          prefix, ids, mask, self.lora_scale, eos=self.tokenizer.eos_id, pad=self.tokenizer.pad_id,
                          num_beams=int(self.eval.num_beams), max_new_tokens=int(self.eval.max_new_tokens))
        return [self.tokenizer.decode(t) for t in np.asarray(tokens)]


def full_prompt(instruction: str) -> str:
    """The original's wrapping of a user's instruction (cli_inference.py)."""
    from jaxaudio.data import salmonn_data as sd
    instruction = (instruction or "").strip()
    if not instruction:
        raise InferError("--prompt is empty")
    return sd.PROMPT_TEMPLATE.format(sd.SPEECH_PREFIX + instruction)


def run(config, workdir: str | None, checkpoint: str | None, audio: str, prompt: str,
        lora_scale: float | None = None, max_seconds: float | None = None) -> str:
    """The answer to `prompt` about the file `audio` (raises `InferError` on bad input)."""
    text = full_prompt(prompt)  # fail before loading the model
    responder = Responder(config, workdir, checkpoint, lora_scale, max_seconds)
    return responder.respond([responder.load(audio)], [text])[0]


def write_answers(config, workdir: str | None, checkpoint: str | None, annotation: str, output: str, *,
                  task: str = "audio_story_telling", prompt: str | None = None, lora_scale: float | None = None,
                  limit: int = 0, batch_size: int = 8) -> int:
    """Answer every clip of an annotation file and write the answers as a new annotation
    file (`{"annotation": [{"path", "text", "task"}]}`): activation data for stage 3 when
    `lora_scale` is discounted. The prompt is `prompt` or the test prompt of `task` in the
    config's prompt files. Returns the number of items written."""
    from jaxaudio.data import salmonn_data as sd
    from jaxaudio.data.manifest import write_json_atomic
    try:
        items = sd.read_annotations(annotation)
    except (sd.AnnotationError, OSError) as e:
        raise InferError(str(e).splitlines()[0]) from None
    seen, clips = set(), []
    for item in items:  # one answer per clip
        if item["path"] not in seen:
            seen.add(item["path"])
            clips.append(item)
    clips = clips[:limit] if limit else clips
    responder = Responder(config, workdir, checkpoint, lora_scale)
    if prompt:
        text = full_prompt(prompt)
    else:
        try:
            text = responder.task.prompt_table().test(task)
        except (KeyError, ValueError) as e:
            raise InferError(f"--task={task}: {str(e).splitlines()[0]}; pass --prompt") from None
    out = []
    for start in range(0, len(clips), batch_size):
        chunk = clips[start:start + batch_size]
        waves = [responder.load(item, start + i) for i, item in enumerate(chunk)]
        for item, answer in zip(chunk, responder.respond(waves, [text] * len(chunk))):
            out.append({"path": os.path.abspath(item["path"]), "text": answer, "task": task})
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_json_atomic(output, {"annotation": out})
    return len(out)
