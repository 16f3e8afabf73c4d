"""AudioBERT's auditory-span detector in the one trainer: BERT token classification with the
original's binary IO tags (1 = inside an auditory span; `data.auditorybench.detector_example`).

As the original (`model/audio_span_detector`): `BertForTokenClassification` (2 labels, no
pooler) from a pretrained BERT, the cross-entropy over all `max_len` positions (padding
included: the original's labels are 0 there, not -100), the attention mask passed; trained
on the animal and pitch training CSVs together by default. Evaluation: the original's
metric, scikit-learn's weighted F1 over the `[N, max_len]` tag arrays, and span-level
exact-match precision / recall / F1 of the span strings read back from the tags.

Start from a converted BERT: `config.init.checkpoint=converted/bert-base-uncased` with
`config.init.fresh="params/classifier/.*"` (the new head keeps its initialisation).
"""
import os
import threading
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxaudio.data.auditorybench import AuditoryItem, detector_example, read_auditorybench_csv, spans_from_tags
from jaxaudio.eval.auditory import detector_weighted_f1, span_prf
from jaxaudio.models.bert import Bert
from jaxaudio.tasks import register
from jaxaudio.tasks.base import Batch, Task


# A fast tokenizer's padding and truncation settings live in its Rust backend, which each
# call sets: two data-loader threads calling one tokenizer with different settings get
# each other's (rows of other lengths). Calls on shared tokenizers take this lock.
TOKENIZER_LOCK = threading.Lock()


def load_bert_tokenizer(path: str):
    """A Hugging Face BERT tokenizer from a local directory (vocab.txt / tokenizer.json)."""
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"config.data.tokenizer={path!r}: a BERT tokenizer directory is needed (the "
                                "converted model's source folder, e.g. bert-base-uncased)")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a Hugging Face tokenizer directory ({str(e).splitlines()[0]})") from None


def ensure_converted_bert(config) -> None:
    """`config.init.bert` from `config.data.bert_source` (a Hugging Face BERT folder) when it
    is not there yet: the tiny default's pretrained BERT is converted on first use."""
    target, source = config.init.get("bert", ""), config.data.get("bert_source", "")
    if not target or not source or os.path.exists(os.path.join(target, "config.json")):
        return
    from jaxaudio.convert.hf import convert_hf
    from jaxaudio.convert.io import save_converted
    variables, cfg = convert_hf(source, "bert")
    save_converted(target, variables, cfg)


def read_items(paths: str, task: str | None = None) -> list[AuditoryItem]:
    """The items of comma-separated AuditoryBench CSVs (the task of each detected from its columns)."""
    items = []
    for path in (p for p in str(paths).split(",") if p):
        items += read_auditorybench_csv(path, task)
    return items


class DetectorSource:
    """Random-access detector examples: ids, mask and IO tags `[max_len]` per sentence."""

    def __init__(self, items: list[AuditoryItem], tokenizer, max_len: int):
        self.items, self.tok, self.max_len = items, tokenizer, max_len

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Batch:
        item = self.items[i]
        # The sentence as the CSV has it, [MASK] included, as the original's `encode_data`.
        with TOKENIZER_LOCK:
            ex = detector_example(self.tok, item.sentence, item.spans, self.max_len)
        return {k: np.asarray(v, np.int32) for k, v in ex.items()} | {"index": np.int32(i)}


class AuditoryBenchTask(Task):
    """What the detector and AudioBERT share: the BERT tokenizer (`data.tokenizer`), the
    CSVs of a split (`data.{train,eval}_csv`, comma-separated, `{root}` = `data.root`) and
    the tiny default's generated corpus and converted BERT."""

    def __init__(self, config):
        self._tokenizer = None
        self._sources: dict[str, Any] = {}
        super().__init__(config)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_bert_tokenizer(self.config.data.tokenizer)
        return self._tokenizer

    def _csvs(self, split: str) -> str:
        d = self.config.data
        paths = d.train_csv if split == "train" else d.eval_csv
        if not paths:
            raise ValueError(f"config.data.{split}_csv is empty: give AuditoryBench CSVs (comma-separated)")
        return paths.format(root=d.root)

    def prepare_data(self) -> None:
        d = self.config.data
        if d.get("generate"):
            from jaxaudio.data.auditorybench_corpus import ensure_auditorybench_corpus
            ensure_auditorybench_corpus(d.root, seed=d.seed)
        ensure_converted_bert(self.config)


@register("audiobert_detector")
class SpanDetectorTask(AuditoryBenchTask):
    def build_model(self) -> Bert:
        return Bert(**detector_kwargs(self.config.model.bert.to_dict()))

    def dummy_batch(self, batch_size: int) -> Batch:
        n = self.config.data.max_len
        return {"input_ids": np.zeros((batch_size, n), np.int32), "attention_mask": np.ones((batch_size, n), np.int32),
                "labels": np.zeros((batch_size, n), np.int32)}

    def init_variables(self, rng: jax.Array):
        b = self.dummy_batch(1)
        return self.model.init({"params": rng}, jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]))

    def loss_fn(self, params, extra, batch, rng):
        out = self.model.apply({"params": params, **extra}, batch["input_ids"], batch["attention_mask"],
                               deterministic=False, rngs={"dropout": rng})
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch["labels"])
        acc = jnp.mean(jnp.argmax(out.logits, -1) == batch["labels"])
        return ce.mean(), ({"tag_accuracy": acc}, extra)

    def eval_step(self, params, extra, batch):
        out = self.model.apply({"params": params, **extra}, batch["input_ids"], batch["attention_mask"])
        return {"preds": jnp.argmax(out.logits, -1).astype(jnp.int32), "labels": batch["labels"],
                "input_ids": batch["input_ids"], "index": batch["index"]}

    def eval_metrics(self, o: dict[str, np.ndarray]) -> dict[str, float]:
        items = self._source("eval").items
        gold = [items[int(i)].spans for i in o["index"]]
        pred = [spans_from_tags(self.tokenizer, ids, tags) for ids, tags in zip(o["input_ids"], o["preds"])]
        metrics = {"weighted_f1": detector_weighted_f1(o["labels"], o["preds"])}
        # The uncased tokenizer reads spans back lower-cased: compare them that way.
        metrics.update({f"span_{k}": v for k, v in span_prf(gold, pred, normalize=str.lower).items()})
        return metrics

    def detect(self, params, sentences: list[str], batch_size: int = 64) -> list[list[str]]:
        """Span strings per sentence (the detector's inference), `batch_size` sentences per
        forward (the last batch padded, so one compile serves every call)."""
        fn = jax.jit(lambda p, ids, mask: jnp.argmax(self.model.apply({"params": p}, ids, mask).logits, -1))
        examples = [detector_example(self.tokenizer, s, [], self.config.data.max_len) for s in sentences]
        out = []
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            rows = chunk + [chunk[-1]] * (batch_size - len(chunk))
            ids = np.stack([e["input_ids"] for e in rows])
            tags = np.asarray(fn(params, jnp.asarray(ids), jnp.asarray(np.stack([e["attention_mask"] for e in rows]))))
            out += [spans_from_tags(self.tokenizer, i, t) for i, t in zip(ids[:len(chunk)], tags[:len(chunk)])]
        return out

    # --- data --------------------------------------------------------------------------
    def _source(self, split: str) -> DetectorSource:
        if split not in self._sources:
            self._sources[split] = DetectorSource(read_items(self._csvs(split)), self.tokenizer,
                                                  self.config.data.max_len)
        return self._sources[split]

    def train_source(self) -> grain.MapDataset:
        return grain.MapDataset.source(self._source("train"))

    def eval_source(self) -> grain.MapDataset:
        return grain.MapDataset.source(self._source("eval"))


def detector_kwargs(bert: dict[str, Any]) -> dict[str, Any]:
    """`Bert` kwargs of the detector: the encoder's, with BertForTokenClassification's head
    (2 labels, no pooler)."""
    return dict(bert, head="token_classification", num_labels=2, pooler=False)
