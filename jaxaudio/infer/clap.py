"""Embedding audio and text with a trained or converted CLAP: what the retrieval index
(`jaxaudio.retrieval`, `launch/index.py`) and AudioBERT's retrieval call.

`ClapEmbedder` holds the module, its variables, the tokenizer and the feature settings,
and compiles one audio and one text forward per batch size (batches are padded to it, so
a folder of clips of any count compiles once). With a mesh the batch is split over its
devices (`batch_sharding`) and the variables are replicated.
"""
from typing import Any, Sequence

import numpy as np

from jaxaudio.infer import InferError, load_model


class ClapEmbedder:
    """`embed_audio(waves) -> [n, dim]`, `embed_text(texts) -> [n, dim]`, both L2-normalised
    float32; `identity` names the model (where it came from and a fingerprint of its
    weights) and `header` is what an index built with it records."""

    def __init__(self, module, variables: dict[str, Any], tokenizer, settings, *, max_text_len: int,
                 batch_size: int = 32, mesh=None, source: str = ""):
        import jax

        from jaxaudio.tasks.clap import fingerprint
        self.module, self.tokenizer, self.settings = module, tokenizer, settings
        self.max_text_len, self.batch_size, self.mesh = max_text_len, batch_size, mesh
        if mesh is not None:
            from jaxaudio.train.mesh import batch_sharding, replicated
            data = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
            self.batch_size = -(-batch_size // data) * data  # whole rows per device
            self._rows = batch_sharding(mesh)
            variables = jax.device_put(variables, replicated(mesh))
        self.variables = variables
        self.source, self.fingerprint = source, fingerprint(variables["params"])
        self._audio = jax.jit(lambda v, x, longer: module.apply(v, x, longer, method="audio_features"))
        self._text = jax.jit(lambda v, ids, mask: module.apply(v, ids, mask, method="text_features"))

    @classmethod
    def from_config(cls, config, workdir: str | None = None, checkpoint: str | None = None, *,
                    batch_size: int | None = None, mesh=None) -> "ClapEmbedder":
        """From a CLAP config and a training run's `workdir` or a converted `checkpoint`
        (`launch.convert`); the config gives the tokenizer, the feature settings and the
        text length. Raises `InferError` with one line on bad input."""
        from jaxaudio.convert.hf import load_pretrained
        from jaxaudio.tasks import get_task
        if config.get("task") != "clap":
            raise InferError(f"--config is a {config.get('task')!r} config; CLAP embeddings need a clap config")
        if bool(workdir) == bool(checkpoint):
            raise InferError("pass exactly one of --workdir (a training run) or --checkpoint (a converted CLAP)")
        with config.unlocked():
            config.init.checkpoint = ""
        try:
            task = get_task("clap")(config)
            tokenizer = task.tokenizer
        except (OSError, ValueError) as e:
            raise InferError(str(e).splitlines()[0]) from None
        module, variables = load_model(task, workdir, checkpoint, load_pretrained)
        if checkpoint and type(module).__name__ != "Clap":
            raise InferError(f"--checkpoint={checkpoint} holds a {type(module).__name__}, not a CLAP")
        return cls(module, variables, tokenizer, task.settings, max_text_len=config.data.max_text_len,
                   batch_size=batch_size or config.train.eval_batch_size, mesh=mesh,
                   source=workdir or checkpoint)

    @property
    def identity(self) -> dict[str, str]:
        from jaxaudio.retrieval.index import model_identity
        return model_identity(self.source, self.fingerprint)

    @property
    def header(self) -> dict[str, Any]:
        """What an index built with this embedder records (and checks at query time)."""
        from jaxaudio.retrieval.index import make_header
        return make_header(self.source, self.fingerprint, self.settings)

    def _batches(self, n: int):
        for start in range(0, n, self.batch_size):
            yield start, min(start + self.batch_size, n)

    def _run(self, fn, arrays: Sequence[np.ndarray], n: int) -> np.ndarray:
        """`fn(variables, *arrays)` on rows padded to the batch size (repeating the last)."""
        import jax
        pad = self.batch_size - n
        arrays = [np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) if pad else a for a in arrays]
        if self.mesh is not None:
            arrays = [jax.device_put(a, self._rows) for a in arrays]
        return np.asarray(jax.device_get(fn(self.variables, *arrays)), np.float32)[:n]

    def embed_audio(self, waves: Sequence[np.ndarray], seed: int = 0) -> np.ndarray:
        """Mono waves `[samples]` at `settings.sample_rate` -> `[n, dim]`; clips over the
        maximum length take the crops of `seed` (deterministic)."""
        from jaxaudio.features.clap import clap_input_features
        if len(waves) == 0:
            raise InferError("no audio to embed")
        out = []
        for start, stop in self._batches(len(waves)):
            features, longer = clap_input_features(list(waves[start:stop]), self.settings, rng=seed + start)
            out.append(self._run(self._audio, [np.asarray(features), np.asarray(longer)], stop - start))
        return np.concatenate(out)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> `[n, dim]`; an empty text is an error naming its position."""
        if len(texts) == 0:
            raise InferError("no text to embed")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise InferError(f"text {i} is empty: a query needs words")
        out = []
        for start, stop in self._batches(len(texts)):
            ids, mask = self.tokenizer.encode_padded(list(texts[start:stop]), self.max_text_len)
            out.append(self._run(self._text, [ids, mask], stop - start))
        return np.concatenate(out)
