"""Spatial-AST trained on binaural clips: class, distance and direction of the source."""
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from jaxaudio.data.audio import fit_length, load_audio
from jaxaudio.data.manifest import labels_to_multihot, read_classes, read_manifest
from jaxaudio.data.spatialsoundqa import render_record
from jaxaudio.data.validate import ClipSpec, check_manifest, raise_if
from jaxaudio.eval.spatial import chance_spatial_metrics, spatial_ast_metrics
from jaxaudio.models.spatial_ast import SpatialAST, spatial_ast_loss
from jaxaudio.tasks import register
from jaxaudio.tasks.base import Batch, Task

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def model_kwargs(model_cfg) -> dict[str, Any]:
    """`config.model` -> `SpatialAST(**kwargs)`, dtype names turned into dtypes."""
    kw = dict(model_cfg)
    for key in ("dtype", "param_dtype"):
        if key in kw:
            if kw[key] not in DTYPES:
                raise ValueError(f"config.model.{key}={kw[key]!r}: choose one of {sorted(DTYPES)}")
            kw[key] = DTYPES[kw[key]]
    unknown = set(kw) - set(SpatialAST.__dataclass_fields__)
    if unknown:
        raise ValueError(f"config.model: unknown Spatial-AST fields {sorted(unknown)}")
    return kw


class ClipSource:
    """Random-access binaural clips from a manifest: `[2, samples]` audio plus targets.

    A record with an `rir` field is the official SpatialSoundQA kind: `audio` is a mono
    clip, rendered through the binaural room response on the fly (resampled to 32 kHz,
    -14 dBFS, fitted to the clip length, RIR cut to 2 s), as the original does.
    """

    def __init__(self, records: list[dict], classes: list[str], sample_rate: int, samples: int):
        self.records, self.samples, self.sample_rate = records, samples, sample_rate
        self.class_index = {c: i for i, c in enumerate(classes)}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Batch:
        r = self.records[i]
        if r.get("rir"):
            wave = render_record(r, clip_seconds=self.samples / self.sample_rate, sample_rate=self.sample_rate)
        else:
            wave = fit_length(load_audio(r["audio"], self.sample_rate, channels=2), self.samples)
        return {
            "wave": wave.astype(np.float32),
            "labels": labels_to_multihot(r["labels"], self.class_index),
            "distance": np.int32(r["distance"]),
            "azimuth": np.int32(r["azimuth"]),
            "elevation": np.int32(r["elevation"]),
        }


def roll_and_scale(example: Batch, rng: np.random.Generator) -> Batch:
    """The original's `roll_mag_aug`: a random circular shift and a gain ~ Beta(10, 10) + 0.5."""
    wave = example["wave"]
    shift = rng.integers(wave.shape[-1])
    gain = rng.beta(10, 10) + 0.5
    return dict(example, wave=(np.roll(wave, shift, axis=-1) * gain).astype(np.float32))


@register("spatial_ast")
class SpatialASTTask(Task):
    def build_model(self) -> SpatialAST:
        return SpatialAST(**model_kwargs(self.config.model))

    @property
    def samples(self) -> int:
        return int(round(self.config.data.clip_seconds * self.model.sample_rate))

    def dummy_batch(self, batch_size: int) -> Batch:
        return {"wave": np.zeros((batch_size, 2, self.samples), np.float32)}

    def batch_spec(self, batch_size: int, train: bool = True) -> Batch:
        m, z = self.model, np.zeros((batch_size,), np.int32)
        return {**self.dummy_batch(batch_size), "labels": np.zeros((batch_size, m.num_classes), np.float32),
                "distance": z, "azimuth": z, "elevation": z}

    def init_variables(self, rng: jax.Array):
        return self.model.init({"params": rng}, jnp.asarray(self.dummy_batch(1)["wave"]))

    def layer_scale(self, path: str) -> float:
        """BEiT layer decay as in the original's `param_groups_lrd`: patch embedding and
        position embedding are layer 0, block i is layer i+1, everything else (stem, CLS
        tokens, heads) the top layer."""
        depth = self.model.depth
        top = depth + 1
        name = path.split("/")[0]
        if name in ("patch_embed", "pos_embed"):
            layer = 0
        elif name.startswith("blocks_"):
            layer = int(name.split("_")[1]) + 1
        else:
            layer = top
        return self.config.optim.layer_decay ** (top - layer)

    def loss_fn(self, params, extra, batch, rng):
        r_drop, r_aug = jax.random.split(rng)
        out, updated = self.model.apply({"params": params, **extra}, batch["wave"], train=True,
                                        rngs={"dropout": r_drop, "augment": r_aug}, mutable=["batch_stats"])
        loss, parts = spatial_ast_loss(out, batch["labels"], batch["distance"], batch["azimuth"],
                                       batch["elevation"], tuple(self.config.train.loss_weights),
                                       float(self.config.train.get("direction_sigma", 0.0)))
        return loss, (parts, {**extra, **updated})

    def eval_step(self, params, extra, batch):
        out = self.model.apply({"params": params, **extra}, batch["wave"], train=False)
        return {"classifier": out["classifier"], "distance_logits": out["distance"], "azimuth_logits": out["azimuth"],
                "elevation_logits": out["elevation"], "labels": batch["labels"], "distance": batch["distance"],
                "azimuth": batch["azimuth"], "elevation": batch["elevation"]}

    def eval_metrics(self, o: dict[str, np.ndarray]) -> dict[str, float]:
        metrics = spatial_ast_metrics(o["classifier"], o["distance_logits"], o["azimuth_logits"],
                                      o["elevation_logits"], o["labels"], o["distance"], o["azimuth"], o["elevation"])
        chance = chance_spatial_metrics(o["labels"], o["distance"], o["elevation"], self.model.num_distance_bins)
        return {**metrics, **chance}

    # --- data --------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Generate the scenes (`data.generate`), then check every clip and label (`check_data`)."""
        d = self.config.data
        if d.generate:
            from jaxaudio.data.scenes import ensure_scenes
            for split, n, seed in (("train", d.num_train, d.seed), ("eval", d.num_eval, d.seed + 1)):
                ensure_scenes(d.root, n, seed, sample_rate=self.model.sample_rate, clip_seconds=d.clip_seconds,
                              split_name=split, num_workers=d.num_workers)
        self.check_data()

    def check_data(self) -> None:
        """Before the first step: the class list's length, and every record of the training and
        (when it will be read) evaluation manifest: its labels, its clip (2 channels, any rate)
        or, for official-layout records, its mono clip and room response (`data.validate`)."""
        d = self.config.data
        splits = self.checked_splits(d.eval_manifest)
        problems = []
        for split in splits:
            manifest, classes_path = self._paths(split)
            classes = read_classes(classes_path)
            if len(classes) != self.model.num_classes and split == "train":
                problems.append(f"{classes_path}: lists {len(classes)} classes, but config.model.num_classes="
                                f"{self.model.num_classes}")
            problems += check_manifest(manifest, read_manifest(manifest), ClipSpec(channels=2), classes=classes,
                                       classes_name=classes_path)
        raise_if(problems, "Spatial-AST data (config.data) that cannot train")

    def _paths(self, split: str) -> tuple[str, str]:
        d = self.config.data
        if d.generate:
            return os.path.join(d.root, f"{split}.jsonl"), os.path.join(d.root, "classes.txt")
        manifest = d.train_manifest if split == "train" else d.eval_manifest
        if not manifest or not d.classes:
            raise ValueError(f"config.data.{split}_manifest and config.data.classes are required "
                             "when config.data.generate is False")
        return manifest, d.classes

    def _source(self, split: str) -> grain.MapDataset:
        manifest, classes_path = self._paths(split)
        classes = read_classes(classes_path)
        if len(classes) != self.model.num_classes:
            raise ValueError(f"config.model.num_classes={self.model.num_classes} but {classes_path} "
                             f"lists {len(classes)} classes")
        records = read_manifest(manifest)
        return grain.MapDataset.source(ClipSource(records, classes, self.model.sample_rate, self.samples))

    def augment(self, ds: grain.MapDataset, seed: int) -> grain.MapDataset:
        if self.config.data.roll_mag_aug:
            ds = ds.random_map(roll_and_scale, seed=seed)
        return ds

    def train_source(self) -> grain.MapDataset:
        return self._source("train")

    def eval_source(self) -> grain.MapDataset:
        return self._source("eval")
