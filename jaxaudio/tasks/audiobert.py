"""AudioBERT in the one trainer: a cloze BERT that hears the sound its auditory spans name.

Per AuditoryBench item (`data.auditorybench`): the sentence's [MASK]s are expanded to one
per answer word piece, each span's text + " sound" is embedded by CLAP's text tower and the
nearest clip of a CLAP index is retrieved (`retrieval.py` of the original: top-1 by cosine,
cached per span text in `<workdir>/retrieval.json`), the clip goes through AST, and its
mean token overwrites the span's first-token embedding (`models.audiobert`). Training
uses the gold spans, as the original; evaluation scores every item twice, with the gold
spans (the oracle) and with the detector's spans (the real pipeline: `eval.detector`, a
detector run), plus the majority answer. `data.text_only` trains the same LoRA with
nothing injected: the text-only row of the paper's table.

`model.freeze_ast` freezes AST (the trainer's `optim.frozen` gains `ast/.*`) and caches
its vector of every retrieved clip: computed once from the run's AST parameters when the
trainer binds them (`bind_variables`: after the initial load and after a restore), the
batches then carry `audio_vectors [S, ast hidden]` instead of AST inputs and the step
runs no AST.

Loss: the MLM cross-entropy at every position against the filled sentence, padding
included, as the original (`train.loss_positions="all"`), or at the answer's word pieces
only (`"answer"`). Accuracy: animal, every answer word piece right (argmax over the whole
vocabulary); pitch, argmax between "lower" and "higher".

The original pads each batch to its longest sentence and passes no attention mask, so its
outputs depend on the batch's padding; here every sentence is padded to `data.max_len`
(static shapes), so "double" injection sees a fixed amount of padding.
"""
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import threading
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxaudio.data.audio import load_audio
from jaxaudio.data.auditorybench import AuditoryItem, ClozeEncoder, retrieval_queries
from jaxaudio.eval.auditory import majority_baseline
from jaxaudio.models.ast import AST, ast_features
from jaxaudio.models.audiobert import AudioBert
from jaxaudio.models.bert import Bert
from jaxaudio.tasks import register
from jaxaudio.tasks.audio_llm import model_kwargs as part_model_kwargs
from jaxaudio.tasks.audiobert_detector import TOKENIZER_LOCK, AuditoryBenchTask, read_items
from jaxaudio.tasks.base import Batch

log = logging.getLogger(__name__)

AST_SAMPLE_RATE = 16000
MIN_SAMPLES = 500  # the original pads shorter clips to 500 samples


def load_config(spec: str):
    """`path/to/config.py[:arg]` -> its `get_config(arg)` (the launchers' `--config` syntax)."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def model_kwargs(model_cfg) -> dict[str, Any]:
    return part_model_kwargs(model_cfg, {"bert": Bert, "ast": AST},
                             {"injection": "double", "gate": "span", "freeze_ast": False})


@functools.lru_cache(maxsize=4)
def _ast_vector_fn(model: AudioBert):
    return jax.jit(lambda params, x: model.apply({"params": params}, x, method=AudioBert.ast_vector))


class Retriever:
    """Query text (`auditorybench.retrieval_queries`: span + " sound") -> (clip path, score):
    CLAP text embedding, top-1 of the index; one search per distinct query, remembered in a json file that is valid for one
    index (its CLAP fingerprint and clip count; another index starts the file afresh)."""

    def __init__(self, cfg, cache_path: str):
        self.cfg, self.cache_path = cfg, cache_path
        self.table: dict[str, list] = {}
        self.key = None
        if cfg.index and os.path.exists(os.path.join(cfg.index, "header.json")):
            with open(os.path.join(cfg.index, "header.json")) as f:
                header = json.load(f)
            self.key = {"index": os.path.abspath(cfg.index), "fingerprint": header["model"]["fingerprint"],
                        "count": header["count"]}
        if os.path.exists(cache_path):
            with open(cache_path) as f:
                cached = json.load(f)
            if cached.get("key") == self.key:
                self.table = cached["table"]

    def resolve(self, queries: set[str]) -> None:
        missing = sorted(set(queries) - set(self.table))
        if not missing:
            return
        from jaxaudio.infer.clap import ClapEmbedder
        from jaxaudio.retrieval.index import ClapIndex
        r = self.cfg
        if not r.index:
            raise ValueError("config.retrieval.index is empty: AudioBERT retrieves its audio from a CLAP index "
                             "(launch.index build)")
        index = ClapIndex.load(r.index)
        embedder = ClapEmbedder.from_config(load_config(r.clap_config), r.clap_workdir or None,
                                            r.clap_checkpoint or None)
        index.check_model(embedder.identity)
        scores, rows = index.search(embedder.embed_text(missing), 1)
        for q, s, i in zip(missing, scores[:, 0], rows[:, 0]):
            self.table[q] = [index.records[int(i)]["audio"], float(s)]
        os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
        tmp = self.cache_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"key": self.key, "table": self.table}, f, indent=0, sort_keys=True)
        os.replace(tmp, self.cache_path)

    def clip(self, query: str) -> str:
        return self.table[query][0]


@dataclasses.dataclass
class Example:
    item: AuditoryItem
    spans: list[str]      # the spans that pick the audio and the injection positions
    mode: int             # 0: gold spans, 1: detected spans


class ClozeSource:
    """AudioBERT examples: the cloze encoding plus AST inputs `audio [S, frames, mel]` of the
    clips the spans retrieve, or with `vectors` (clip path -> AST vector) `audio_vectors
    [S, ast hidden]`; a slot without a span: zeros, and position -1."""

    def __init__(self, examples: list[Example], encoder: ClozeEncoder, retriever: Retriever, slots: int,
                 ast_kw: dict[str, Any], text_only: bool, gate: str,
                 vectors: Callable[[str], np.ndarray] | None = None, vector_width: int = 0):
        self.examples, self.enc, self.retriever, self.slots = examples, encoder, retriever, slots
        self.ast_kw, self.text_only, self.gate = ast_kw, text_only, gate
        self.vectors, self.vector_width = vectors, vector_width

    def clips(self) -> set[str]:
        """The paths of every clip the examples inject."""
        out = set()
        for ex in self.examples:
            if not self.text_only:
                spans = list(ex.spans)[:self.slots]
                queries = retrieval_queries(ex.item.task, spans)
                slots = range(self.slots) if self.gate == "always" else range(len(spans))
                out.update(self.retriever.clip(queries[s]) for s in slots)
        return out

    def features(self, path: str) -> np.ndarray:
        """AST's input `[frames, mel]` of the clip at `path` (mono, 16 kHz)."""
        return self._audio(path)

    def __len__(self) -> int:
        return len(self.examples)

    @functools.lru_cache(maxsize=4096)
    def _audio(self, path: str) -> np.ndarray:
        wave = load_audio(path, AST_SAMPLE_RATE).mean(0)
        if len(wave) < MIN_SAMPLES:
            wave = np.pad(wave, (0, MIN_SAMPLES - len(wave)))
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            return np.asarray(ast_features(jnp.asarray(wave), **self.ast_kw), np.float32)

    def __getitem__(self, i: int) -> Batch:
        ex = self.examples[i]
        spans = list(ex.spans)[:self.slots]
        with TOKENIZER_LOCK:
            enc = self.enc.encode(dataclasses.replace(ex.item, spans=spans))
        last = int(np.sum(enc["attention_mask"])) - 1
        positions = np.full((self.slots,), -1, np.int32)
        for s in range(self.slots):
            if s < len(spans):
                positions[s] = enc["span_positions"][s]
            elif self.gate == "always":  # the released code always injects: its fallbacks
                positions[s] = 0 if s == 0 else last
        if self.text_only:
            positions[:] = -1
        if self.vectors is None:
            shape, load, key = (self.ast_kw["max_length"], self.ast_kw["num_mel_bins"]), self._audio, "audio"
        else:
            shape, load, key = (self.vector_width,), self.vectors, "audio_vectors"
        audio = np.zeros((self.slots,) + shape, np.float32)
        queries = retrieval_queries(ex.item.task, spans)  # with the original's fallbacks
        for s in range(self.slots):
            if positions[s] >= 0:
                audio[s] = load(self.retriever.clip(queries[s]))
        return {"input_ids": np.asarray(enc["input_ids"], np.int32),
                "attention_mask": np.asarray(enc["attention_mask"], np.int32),
                "labels": np.asarray(enc["labels"], np.int32), "answer_mask": np.asarray(enc["answer_mask"], bool),
                "span_positions": positions, key: audio, "mode": np.int32(ex.mode), "index": np.int32(i)}


@register("audiobert")
class AudioBertTask(AuditoryBenchTask):
    def __init__(self, config):
        super().__init__(config)
        if config.data.task not in ("animal", "pitch"):
            raise ValueError(f"config.data.task={config.data.task!r}: choose 'animal' or 'pitch'")
        self._vectors: dict[str, np.ndarray] = {}
        self._vector_params: tuple[str, Any] | None = None  # (fingerprint, AST params on the host)
        self._features: ClozeSource | None = None
        self._vector_lock = threading.Lock()
        if self.model.freeze_ast:
            # A frozen AST must not move under weight decay either: its parameters leave the optimizer.
            frozen = config.optim.get("frozen") or ""
            if "ast/.*" not in frozen:
                with config.unlocked():
                    config.optim.frozen = f"(?:{frozen})|ast/.*" if frozen else "ast/.*"

    def build_model(self) -> AudioBert:
        return AudioBert(**model_kwargs(self.config.model))

    @property
    def slots(self) -> int:
        return 1 if self.config.data.task == "animal" else 2

    @property
    def ast_kw(self) -> dict[str, Any]:
        a = self.model.ast
        return {"num_mel_bins": int(a.get("num_mel_bins", 128)), "max_length": int(a.get("max_length", 1024))}

    def pretrained_parts(self) -> dict[str, str]:
        return {part: self.config.init[part] for part in ("bert", "ast") if self.config.init.get(part)}

    @property
    def ast_width(self) -> int:
        return int(self.model.ast.get("hidden_size", AST.hidden_size))

    def dummy_batch(self, batch_size: int, audio: bool | None = None) -> Batch:
        """The batch's shapes; AST inputs, or with a frozen AST (`audio=False`) its vectors."""
        n, s, k = self.config.data.max_len, self.slots, self.ast_kw
        batch = {"input_ids": np.zeros((batch_size, n), np.int32),
                 "attention_mask": np.ones((batch_size, n), np.int32), "span_positions": np.zeros((batch_size, s), np.int32)}
        if (not self.model.freeze_ast) if audio is None else audio:
            batch["audio"] = np.zeros((batch_size, s, k["max_length"], k["num_mel_bins"]), np.float32)
        else:
            batch["audio_vectors"] = np.zeros((batch_size, s, self.ast_width), np.float32)
        return batch

    def batch_spec(self, batch_size: int, train: bool = True) -> Batch:
        n, z = self.config.data.max_len, np.zeros((batch_size,), np.int32)
        return {**self.dummy_batch(batch_size), "labels": np.zeros((batch_size, n), np.int32),
                "answer_mask": np.zeros((batch_size, n), bool), "mode": z, "index": z}

    def init_variables(self, rng: jax.Array):
        b = {k: jnp.asarray(v) for k, v in self.dummy_batch(1, audio=True).items()}  # AST's parameters exist
        return self.model.init({"params": rng, "dropout": rng}, b["input_ids"], b["attention_mask"],
                               b["span_positions"], audio=b["audio"])

    def _logits(self, params, extra, batch, train: bool, rng=None):
        kw = {"rngs": {"dropout": rng}} if train else {}
        audio = {k: batch[k] for k in ("audio", "audio_vectors") if k in batch}
        return self.model.apply({"params": params, **extra}, batch["input_ids"], batch["attention_mask"],
                                batch["span_positions"], train=train, **audio, **kw)

    # --- the frozen AST's vectors ----------------------------------------------------------
    def bind_variables(self, variables) -> None:
        """With `model.freeze_ast`: take the run's AST parameters and compute the vector of
        every clip the training and evaluation examples inject. Cheap when the AST
        parameters have not changed (a restore of a frozen run)."""
        if self.model.freeze_ast and self.set_ast_parameters(variables):
            paths = sorted(set().union(*(self._source(split).clips() for split in ("train", "eval"))))
            with self._vector_lock:
                self._compute_vectors(paths)
            log.info("frozen AST: cached the vectors of %d clips", len(paths))

    def set_ast_parameters(self, variables) -> bool:
        """Use `variables["params"]["ast"]` for the cached vectors (dropped if these
        parameters differ from the last ones); returns whether they differ."""
        ast = variables["params"]["ast"]
        if jax.process_count() > 1 and not all(x.is_fully_addressable for x in jax.tree.leaves(ast)):
            from jax.experimental import multihost_utils
            ast = multihost_utils.process_allgather(ast, tiled=True)
        ast = jax.tree.map(np.asarray, jax.device_get(ast))
        digest = hashlib.sha1()
        for x in jax.tree.leaves(ast):
            digest.update(np.ascontiguousarray(x).tobytes())
        with self._vector_lock:
            if self._vector_params is not None and self._vector_params[0] == digest.hexdigest():
                return False
            self._vector_params = (digest.hexdigest(), {"ast": ast})
            self._vectors = {}
            return True

    def _compute_vectors(self, paths: list[str], batch: int = 16) -> None:
        if self._features is None:
            self._features = ClozeSource([], None, None, self.slots, self.ast_kw, False, self.model.gate)
        apply = _ast_vector_fn(self.model)
        params = self._vector_params[1]
        for start in range(0, len(paths), batch):
            chunk = paths[start:start + batch]
            x = np.stack([self._features.features(p) for p in chunk])
            x = np.pad(x, ((0, batch - len(chunk)), (0, 0), (0, 0)))  # one compiled shape
            for p, v in zip(chunk, np.asarray(apply(params, x))):
                self._vectors[p] = v

    def ast_vector_of(self, path: str) -> np.ndarray:
        """The frozen AST's vector `[ast hidden]` of the clip at `path` (`bind_variables` first)."""
        with self._vector_lock:
            if self._vector_params is None:
                raise RuntimeError("AudioBertTask: the frozen AST has no parameters (bind_variables or "
                                   "set_ast_parameters first)")
            if path not in self._vectors:
                self._compute_vectors([path], batch=1)
            return self._vectors[path]

    def loss_fn(self, params, extra, batch, rng):
        logits = self._logits(params, extra, batch, True, rng)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"])
        if self.config.train.get("loss_positions", "all") == "answer":
            w = batch["answer_mask"].astype(jnp.float32)
            loss = (ce * w).sum() / jnp.maximum(w.sum(), 1.0)
        else:
            loss = ce.mean()
        return loss, ({"answer_acc": self._correct(logits, batch).mean()}, extra)

    def _correct(self, logits, batch) -> jax.Array:
        """Per example: animal, every answer word piece right; pitch, lower/higher right."""
        mask = batch["answer_mask"]
        if self.config.data.task == "pitch":
            lower, higher = self.tokenizer.convert_tokens_to_ids(["lower", "higher"])
            pair = logits[..., jnp.asarray([lower, higher])]
            pred = jnp.where(jnp.argmax(pair, -1) == 0, lower, higher)
        else:
            pred = jnp.argmax(logits, -1)
        right = jnp.where(mask, pred == batch["labels"], True)
        return jnp.all(right, axis=-1) & jnp.any(mask, axis=-1)

    def eval_step(self, params, extra, batch):
        logits = self._logits(params, extra, batch, False)
        return {"correct": self._correct(logits, batch), "mode": batch["mode"], "index": batch["index"]}

    def eval_metrics(self, o: dict[str, np.ndarray]) -> dict[str, float]:
        examples = self._source("eval").examples
        out = {}
        for mode, name in ((0, "gold_spans"), (1, "detected_spans")):
            sel = o["mode"] == mode
            if sel.any():
                out[f"acc_{name}"] = float(np.mean(o["correct"][sel]))
        gold = [examples[int(i)].item.answer for i, m in zip(o["index"], o["mode"]) if m == 0]
        if gold:
            train_answers = [it.answer for it in read_items(self._csvs("train"), self.config.data.task)]
            out["acc_majority"] = majority_baseline(gold, train_answers)["accuracy"]
        return out

    # --- data --------------------------------------------------------------------------
    @property
    def workdir_cache(self) -> str:
        return self.config.retrieval.get("cache") or os.path.join(self.config.data.root, "retrieval.json")

    def _detected(self, items: list[AuditoryItem]) -> list[list[str]]:
        """The detector's spans of each eval sentence (cached beside the retrieval table)."""
        det = self.config.eval.get("detector", "")
        if not det:
            return []
        path = os.path.splitext(self.workdir_cache)[0] + ".detected.json"
        cache = {}
        if os.path.exists(path):
            with open(path) as f:
                cache = json.load(f)
        todo = [it.sentence for it in items if it.sentence not in cache]
        if todo:
            from jaxaudio.tasks.audiobert_detector import SpanDetectorTask
            from jaxaudio.train.loop import load_run_variables
            detector = SpanDetectorTask(self.config)
            params = load_run_variables(det)["params"]
            for s, spans in zip(todo, detector.detect(params, todo)):
                cache[s] = spans
            with open(path, "w") as f:
                json.dump(cache, f)
        return [cache[it.sentence] for it in items]

    def _source(self, split: str) -> ClozeSource:
        if split not in self._sources:
            d = self.config.data
            items = read_items(self._csvs(split), d.task)
            examples = [Example(it, list(it.spans), 0) for it in items]
            if split == "eval":
                examples += [Example(it, spans, 1) for it, spans in zip(items, self._detected(items))]
            encoder = ClozeEncoder(self.tokenizer, d.max_len)
            with TOKENIZER_LOCK:  # checks every item now and says once how many spans fell back
                encoder.encode_all([ex.item for ex in examples if ex.mode == 0])
            retriever = Retriever(self.config.retrieval, self.workdir_cache)
            if not d.text_only:
                retriever.resolve({q for ex in examples for q in retrieval_queries(d.task, ex.spans)})
            frozen = self.model.freeze_ast and not d.text_only
            self._sources[split] = ClozeSource(examples, encoder, retriever, self.slots, self.ast_kw, d.text_only,
                                               self.model.gate, vectors=self.ast_vector_of if frozen else None,
                                               vector_width=self.ast_width)
        return self._sources[split]

    def prepare_data(self) -> None:
        super().prepare_data()
        # Retrieval and detection load CLAP and the detector (their own jits): done here,
        # before the trainer's mesh context, and cached for every process.
        for split in ("train", "eval"):
            self._source(split)

    def train_source(self) -> grain.MapDataset:
        return grain.MapDataset.source(self._source("train"))

    def eval_source(self) -> grain.MapDataset:
        return grain.MapDataset.source(self._source("eval"))

    def format_results(self, metrics: dict[str, float]) -> str:
        task = self.config.data.task
        name = "text-only (same LoRA)" if self.config.data.text_only else "AudioBERT"
        rows = [(f"{name}, gold spans", metrics.get("acc_gold_spans")),
                (f"{name}, detected spans", metrics.get("acc_detected_spans")),
                ("majority (train answer)", metrics.get("acc_majority"))]
        lines = [f"{task} accuracy"] + [f"  {name:<28}{v:>8.4f}" for name, v in rows if v is not None]
        return "\n".join(lines)
