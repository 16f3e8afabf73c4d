"""CLAP (LAION's contrastive audio-text model) in the one trainer.

Each example is a clip and its caption: the clip becomes CLAP's `input_features`
(`features.clap`, on the host, with a crop seed keyed by the example's index), the
caption `[BOS] text [EOS]` token ids. The loss is LAION's symmetric InfoNCE over the
*global* batch: the train step is traced over the whole (sharded) batch, so every audio
embedding meets every caption of every device, which is what LAION's `gather_with_grad`
builds by hand, gradients included. The logit scales are learned and, as LAION does after
each optimizer step, kept inside `[0, log 100]` (`optim.clamp`).

Evaluation: text->audio and audio->text R@1/5/10 and mAP@10 over the held-out clips (one
caption each), and zero-shot classification: each clip against `data.class_template`
filled with every class name of `data.classes`.
"""
import hashlib
import math
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxaudio.data.audio import load_audio
from jaxaudio.data.manifest import read_classes, read_manifest
from jaxaudio.data.tokenizer import TextTokenizer, ensure_tokenizer
from jaxaudio.data.validate import ClipSpec, check_manifest, raise_if
from jaxaudio.eval.retrieval import retrieval_metrics
from jaxaudio.features.clap import ClapFeatureSettings, clap_input_features
from jaxaudio.models.bert import Bert
from jaxaudio.models.clap import HTSAT, Clap
from jaxaudio.tasks import register
from jaxaudio.tasks.audio_llm import model_kwargs as part_model_kwargs
from jaxaudio.tasks.base import Batch, Task

LOGIT_SCALE_MAX = math.log(100.0)  # LAION: `logit_scale.clamp_(0, math.log(100))` after each step


def model_kwargs(model_cfg) -> dict[str, Any]:
    """`config.model` -> `Clap(**kwargs)`: `audio` (HTSAT fields), `text` (Bert fields),
    `projection_dim`, `logit_scale_init`, dtypes; unknown fields are named."""
    kw = part_model_kwargs(model_cfg, {"audio": HTSAT, "text": Bert},
                           {"projection_dim": 512, "logit_scale_init": math.log(1 / 0.07), "pad_token_id": 1})
    kw.pop("lora")
    return kw


def feature_settings(data_cfg) -> ClapFeatureSettings:
    """`config.data.features` (ClapFeatureSettings fields) -> the settings."""
    fields = dict(data_cfg.features)
    unknown = set(fields) - set(ClapFeatureSettings.__dataclass_fields__)
    if unknown:
        raise ValueError(f"config.data.features: unknown fields {sorted(unknown)}")
    return ClapFeatureSettings(**fields)


def contrastive_loss(logits_per_audio: jax.Array, logits_per_text: jax.Array) -> jax.Array:
    """LAION's `ClipLoss`: `(CE(audio -> its caption) + CE(caption -> its audio)) / 2`;
    both `[batch, batch]`, the matching pair on the diagonal."""
    labels = jnp.arange(logits_per_audio.shape[0])
    a = optax.softmax_cross_entropy_with_integer_labels(logits_per_audio.astype(jnp.float32), labels)
    t = optax.softmax_cross_entropy_with_integer_labels(logits_per_text.astype(jnp.float32), labels)
    return (a.mean() + t.mean()) / 2


def fingerprint(params: Any) -> str:
    """A short content hash of a CLAP's projection heads and logit scales: two different
    CLAPs (or two checkpoints of one run) differ there, and it costs nothing to compute.
    The retrieval index records it to refuse queries from another model."""
    h = hashlib.sha256()
    for part in ("audio_projection", "text_projection", "logit_scale_a", "logit_scale_t"):
        for leaf in jax.tree.leaves(params[part]):
            h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return h.hexdigest()[:16]


class CaptionSource:
    """Random-access (clip, caption) pairs from a jsonl manifest.

    A record is `{"audio": path, "caption": str or [str, ...], "label"?: class name}`; with
    several captions, training takes one per example (seeded by epoch and index, see
    `CLAPTask.augment`), evaluation the first. Audio is read mono at the feature settings'
    rate (another rate is resampled, said once) and turned into `input_features` with the
    crop seed `seed + index`, so a resumed run and every process see the same crops.
    """

    def __init__(self, records: list[dict], tokenizer: TextTokenizer, settings: ClapFeatureSettings, max_len: int,
                 class_index: dict[str, int], seed: int):
        self.records, self.tok, self.settings, self.max_len = records, tokenizer, settings, max_len
        self.class_index, self.seed = class_index, seed

    def __len__(self) -> int:
        return len(self.records)

    def captions(self, i: int) -> list[str]:
        caption = self.records[i]["caption"]
        return [caption] if isinstance(caption, str) else list(caption)

    def text(self, caption: str) -> Batch:
        ids, mask = self.tok.encode_padded([caption], self.max_len)
        return {"input_ids": ids[0], "attention_mask": mask[0]}

    def __getitem__(self, i: int) -> Batch:
        r = self.records[i]
        wave = load_audio(r["audio"], self.settings.sample_rate, channels=None).mean(0)
        # Host features: keep them off the accelerator the train step runs on.
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            features, longer = clap_input_features([wave], self.settings, rng=self.seed + i)
        label = self.class_index.get(r.get("label"), -1)
        return {"input_features": np.asarray(features[0], np.float32), "is_longer": np.asarray(longer[0], bool),
                **self.text(self.captions(i)[0]), "label": np.int32(label), "index": np.int32(i)}


def _caption_problem(record: dict) -> str | None:
    caption = record.get("caption")
    ok = isinstance(caption, str) and caption.strip() or (
        isinstance(caption, list) and caption and all(isinstance(c, str) and c.strip() for c in caption))
    return None if ok else "needs a non-empty 'caption' (a string or a list of strings)"


def _check_records(records: list[dict], path: str) -> None:
    for n, r in enumerate(records, start=1):
        if problem := _caption_problem(r):
            raise ValueError(f"{path}: record {n} ({r.get('audio')}) {problem}")


@register("clap")
class CLAPTask(Task):
    def __init__(self, config):
        self._tokenizer: TextTokenizer | None = None
        self._sources: dict[str, CaptionSource] = {}
        super().__init__(config)
        if int(config.train.accum_steps) != 1:
            raise ValueError(f"config.train.accum_steps={config.train.accum_steps}: the contrastive loss needs "
                             "every caption of the batch as a negative; use 1 (and a smaller batch_size)")
        self.settings = feature_settings(config.data)
        if self.settings.truncation == "fusion" and not self.model.audio.get("enable_fusion", False):
            raise ValueError("config.data.features.truncation='fusion' makes 4-channel inputs, but "
                             "config.model.audio.enable_fusion is False; use 'rand_trunc' or enable fusion")

    def build_model(self) -> Clap:
        return Clap(**model_kwargs(self.config.model))

    # --- model -------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return 4 if self.model.audio.get("enable_fusion", False) else 1

    def dummy_batch(self, batch_size: int) -> Batch:
        s, max_len = self.settings, self.config.data.max_text_len
        return {"input_features": np.zeros((batch_size, self.channels, s.frames, s.num_mel_bins), np.float32),
                "is_longer": np.zeros((batch_size,), bool),
                "input_ids": np.zeros((batch_size, max_len), np.int32),
                "attention_mask": np.ones((batch_size, max_len), np.int32)}

    def batch_spec(self, batch_size: int, train: bool = True) -> Batch:
        return {**self.dummy_batch(batch_size), "label": np.zeros((batch_size,), np.int32),
                "index": np.zeros((batch_size,), np.int32)}

    def init_variables(self, rng: jax.Array):
        b = {k: jnp.asarray(v) for k, v in self.dummy_batch(2).items()}
        return self.model.init({"params": rng}, b["input_features"], b["is_longer"], b["input_ids"],
                               b["attention_mask"])

    def _forward(self, params, extra, batch, train: bool, rng=None):
        kw = dict(rngs={"dropout": rng}, mutable=["batch_stats"]) if train else {}
        return self.model.apply({"params": params, **extra}, batch["input_features"], batch["is_longer"],
                                batch["input_ids"], batch["attention_mask"], train=train, **kw)

    def loss_fn(self, params, extra, batch, rng):
        out, updated = self._forward(params, extra, batch, True, rng)
        logits_a, logits_t = out["logits_per_audio"], out["logits_per_text"]
        if self.config.train.get("loss_scale", "laion") == "laion":
            # LAION's ClipLoss without `mlp_loss`: logit_scale_a for both directions;
            # logit_scale_t trains only in the two-scale form (transformers' ClapModel loss).
            logits_t = logits_a.T
        loss = contrastive_loss(logits_a, logits_t)
        acc = jnp.mean(jnp.argmax(logits_a, -1) == jnp.arange(logits_a.shape[0]))
        metrics = {"contrastive": loss, "batch_a2t_acc": acc, "logit_scale_a": jnp.exp(params["logit_scale_a"]),
                   "logit_scale_t": jnp.exp(params["logit_scale_t"])}
        return loss, (metrics, {**extra, **updated})

    def eval_step(self, params, extra, batch):
        variables = {"params": params, **extra}
        audio = self.model.apply(variables, batch["input_features"], batch["is_longer"], method="audio_features")
        text = self.model.apply(variables, batch["input_ids"], batch["attention_mask"], method="text_features")
        out = {"audio_embeds": audio, "text_embeds": text, "label": batch["label"]}
        if self.class_prompts is not None:
            ids, mask = self.class_prompts
            classes = self.model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), method="text_features")
            out["zero_shot"] = jnp.argmax(audio @ classes.T, axis=-1)
        return out

    def eval_metrics(self, o: dict[str, np.ndarray]) -> dict[str, float]:
        n = len(o["audio_embeds"])
        metrics = retrieval_metrics(o["audio_embeds"], o["text_embeds"], np.arange(n))
        if "zero_shot" in o:
            known = o["label"] >= 0
            if known.any():
                metrics["zero_shot_acc"] = float(np.mean(o["zero_shot"][known] == o["label"][known]))
                metrics["chance_zero_shot_acc"] = 1.0 / len(self.classes)
        return metrics

    # --- text --------------------------------------------------------------------------
    @property
    def tokenizer_path(self) -> str:
        d = self.config.data
        return d.tokenizer or os.path.join(d.root, "tokenizer.json")

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            d, path = self.config.data, self.tokenizer_path
            if not os.path.exists(path):
                raise FileNotFoundError(f"no tokenizer at {path}: set config.data.tokenizer (a tokenizer.json or "
                                        "a Hugging Face tokenizer directory, e.g. the CLAP checkpoint's), or "
                                        "keep config.data.generate, which trains one on the captions")
            self._tokenizer = TextTokenizer(path, d.bos_token, d.eos_token, d.pad_token)
            vocab = self.model.text.get("vocab_size", Bert.vocab_size)
            if self._tokenizer.pad_id != self.model.pad_token_id:
                raise ValueError(f"tokenizer {path} pads with id {self._tokenizer.pad_id} ({d.pad_token!r}), but "
                                 f"config.model.pad_token_id={self.model.pad_token_id}: RoBERTa's positions count "
                                 "from the pad id, so the two must agree")
            if self._tokenizer.vocab_size > vocab:
                raise ValueError(f"tokenizer {path} has {self._tokenizer.vocab_size} tokens, more than "
                                 f"config.model.text.vocab_size={vocab}")
        return self._tokenizer

    @property
    def classes(self) -> list[str] | None:
        path = self._paths("eval")[1]
        return read_classes(path) if path else None

    @property
    def class_prompts(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Token ids and mask `[classes, max_text_len]` of the zero-shot prompts (None: no classes)."""
        classes = self.classes
        if not classes:
            return None
        return self.tokenizer.encode_padded([self.class_prompt(c) for c in classes], self.config.data.max_text_len)

    def class_prompt(self, name: str) -> str:
        """`data.class_template` filled with the class name; an empty template: the generated
        corpus' own phrase for the class ("the sound of a bell")."""
        template = self.config.data.class_template
        if not template:
            from jaxaudio.data.clap_corpus import class_prompt
            return class_prompt(name)
        return template.format(name.replace("_", " "))

    # --- data --------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Generate the captioned corpus (`data.corpus`: "clap", the captioned procedural sounds,
        or "auditorybench", AudioBERT's invented sound sources) and train the tokenizer on its
        captions, unless both exist; then check the data (`check_data`)."""
        if self.config.data.generate:
            self._generate()
        self.check_data()

    def check_data(self) -> None:
        """Before the first step: every record of the training and (when it will be read)
        evaluation manifest has a caption, a `label` in `data.classes` (when both are given),
        and a clip that can be read (`data.validate`: headers only; any channels and rate)."""
        d = self.config.data
        splits = self.checked_splits(d.eval_manifest)
        manifests = list(dict.fromkeys(self._paths(split)[0] for split in splits))  # one file may serve both
        classes_path = self._paths("eval")[1] if len(splits) > 1 else ""
        classes = read_classes(classes_path) if classes_path else None
        problems = []
        for manifest in manifests:
            records = read_manifest(manifest, required=("audio", "caption"))
            problems += check_manifest(manifest, records, ClipSpec(), classes=classes, classes_name=classes_path,
                                       label_field="label", record_check=_caption_problem)
        raise_if(problems, "CLAP data (config.data) that cannot train")

    def _generate(self) -> None:
        d = self.config.data
        corpus = d.get("corpus", "clap")
        if corpus == "auditorybench":
            from jaxaudio.data.auditorybench_corpus import ensure_auditorybench_corpus
            ensure_auditorybench_corpus(d.root, seed=d.seed)
        elif corpus == "clap":
            from jaxaudio.data.clap_corpus import ensure_clap_corpus
            ensure_clap_corpus(d.root, d.num_train, d.num_eval, d.seed, sample_rate=self.settings.sample_rate,
                               clip_seconds=d.clip_seconds, num_workers=d.num_workers)
        else:
            raise ValueError(f"config.data.corpus={corpus!r}: choose 'clap' or 'auditorybench'")
        if d.tokenizer:
            return
        train, classes = self._paths("train")
        records = read_manifest(train, required=("audio", "caption"))

        def texts():
            for r in records:
                yield from ([r["caption"]] if isinstance(r["caption"], str) else r["caption"])
            for c in (read_classes(classes) if classes else []):
                yield self.class_prompt(c)
        vocab = self.model.text.get("vocab_size", Bert.vocab_size)
        params = {"manifest": train, "count": len(records), "seed": d.seed, "template": d.class_template}
        if ensure_tokenizer(self.tokenizer_path, texts, vocab, params):
            self._tokenizer = None

    def _paths(self, split: str) -> tuple[str, str]:
        """`(manifest, classes file or "")` of a split."""
        d = self.config.data
        if d.generate and d.get("corpus", "clap") == "auditorybench":
            # CLAP hears every invented source: it trains (and is checked) on all the clips.
            return os.path.join(d.root, "clips.jsonl"), ""
        if d.generate:
            return os.path.join(d.root, f"{split}.jsonl"), os.path.join(d.root, "classes.txt")
        manifest = d.train_manifest if split == "train" else d.eval_manifest
        if not manifest:
            raise ValueError(f"config.data.{split}_manifest is required when config.data.generate is False")
        return manifest, d.classes

    def _source(self, split: str) -> CaptionSource:
        if split not in self._sources:
            manifest, _ = self._paths(split)
            records = read_manifest(manifest, required=("audio", "caption"))
            _check_records(records, manifest)
            classes = self.classes or []
            self._sources[split] = CaptionSource(records, self.tokenizer, self.settings, self.config.data.max_text_len,
                                                 {c: i for i, c in enumerate(classes)},
                                                 self.config.seed + (0 if split == "train" else 1_000_003))
        return self._sources[split]

    def train_source(self) -> grain.MapDataset:
        if self.config.train.get("eval_every"):
            self._source("eval")  # its files are checked now, not after the first training interval
        return grain.MapDataset.source(self._source("train"))

    def eval_source(self) -> grain.MapDataset:
        return grain.MapDataset.source(self._source("eval"))

    def augment(self, ds: grain.MapDataset, seed: int) -> grain.MapDataset:
        """Clips with several captions (Clotho: five) train on a random one each epoch."""
        source = self._source("train")
        if all(len(source.captions(i)) == 1 for i in range(len(source))):
            return ds

        def pick(example: Batch, rng: np.random.Generator) -> Batch:
            options = source.captions(int(example["index"]))
            return {**example, **source.text(options[int(rng.integers(len(options)))])}
        return ds.random_map(pick, seed=seed)
