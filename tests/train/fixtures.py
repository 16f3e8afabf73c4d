"""A tiny Spatial-AST run config on a few random binaural clips (shared by trainer tests)."""
import os

import numpy as np

from configs import spatial_ast_tiny
from jaxaudio.data.audio import write_wav
from jaxaudio.data.manifest import write_classes, write_manifest

CLASSES = ["a", "b", "c", "d"]


def make_clips(root: str, n_train: int = 16, n_eval: int = 6, seconds: float = 0.5, sr: int = 32000) -> None:
    rng = np.random.default_rng(0)
    write_classes(os.path.join(root, "classes.txt"), CLASSES)
    for split, n in (("train", n_train), ("eval", n_eval)):
        records = []
        for i in range(n):
            name = f"{split}_{i}.wav"
            write_wav(os.path.join(root, name), (0.1 * rng.standard_normal((2, int(seconds * sr)))).astype(np.float32), sr)
            records.append(dict(audio=name, labels=[CLASSES[i % 4]], azimuth=int(rng.integers(360)),
                                elevation=int(rng.integers(60, 120)), distance=int(rng.integers(21))))
        write_manifest(os.path.join(root, f"{split}.jsonl"), records)


def tiny_config(root: str, steps: int = 4):
    c = spatial_ast_tiny.get_config()
    c.model.update(dict(n_mels=32, target_frames=64, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                        mlp_ratio=2.0, num_classes=len(CLASSES), drop_path_rate=0.1, time_mask=8, freq_mask=4))
    c.data.update(dict(generate=False, clip_seconds=0.5, train_manifest=os.path.join(root, "train.jsonl"),
                       eval_manifest=os.path.join(root, "eval.jsonl"), classes=os.path.join(root, "classes.txt")))
    c.train.update(dict(steps=steps, batch_size=8, eval_batch_size=4, log_every=1, eval_every=0,
                        checkpoint_every=2, data_threads=1, data_prefetch=0))
    c.optim.update(dict(warmup_steps=1, total_steps=steps, layer_decay=0.75))
    c.mesh.update(dict(data=1, fsdp=1, tensor=1))
    return c


def get_config(spec: str):
    """As a config file for the launchers: `tests/train/fixtures.py:ROOT[,STEPS]` (clips made
    in ROOT if missing)."""
    root, _, steps = spec.partition(",")
    if not os.path.exists(os.path.join(root, "train.jsonl")):
        os.makedirs(root, exist_ok=True)
        make_clips(root)
    return tiny_config(root, int(steps or 4))
