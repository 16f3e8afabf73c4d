"""Spatial-AST at the original's size and hyperparameters (`scripts/finetune-2m.sh`).

ViT-B (768 wide, 12 blocks, 12 heads), 1024x128 input, 355 classes; AdamW with
blr 1e-3 scaled by batch/256, weight decay 5e-4, layer decay 0.75, half-cycle cosine to
1e-6 after 10 of 100 epochs of warm-up; 64 clips per GPU on 4 GPUs; roll/magnitude
augmentation and 2-D patch masking 0.25/0.25. One "epoch" of the AS-2M script is
`epoch_len` = 10,000 weighted-sampled clips, i.e. about 39 steps of 256.

Point `data.train_manifest` / `data.eval_manifest` / `data.classes` at real data (see
`jaxaudio.data.spatialsoundqa` for the official layout), or keep `data.generate`.
"""
from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.task = "spatial_ast"
    c.seed = 0

    c.model = ConfigDict(dict(
        sample_rate=32000, n_fft=1024, hop_length=320, n_mels=128, fmin=50.0, fmax=14000.0,
        target_frames=1024, stft_method="fft", patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
        num_cls_tokens=3, num_classes=355, num_distance_bins=21, num_azimuth_bins=360,
        num_elevation_bins=180, eps=1e-6, head_init_std=2e-5, stem_channels=1, normalize_ipd=False, drop_path_rate=0.1, time_mask=192,
        freq_mask=48, mask_t_prob=0.25, mask_f_prob=0.25, remat="none", attention_impl=None,
        dtype="bfloat16", param_dtype="float32"))

    c.data = ConfigDict(dict(
        generate=False, root="data_cache/spatial_ast", num_train=0, num_eval=0, seed=0, num_workers=2,
        clip_seconds=10.0, train_manifest="", eval_manifest="", classes="",
        # The original's roll + magnitude augmentation. Its in-dataset mixup mixes *mono*
        # sources before one room response; rendered binaural clips cannot be mixed that
        # way (it would mix two directions), so it is not offered for manifests.
        roll_mag_aug=True))

    batch = 256
    steps_per_epoch = 10_000 // batch + 1
    c.train = ConfigDict(dict(
        steps=100 * steps_per_epoch, batch_size=batch, accum_steps=1, eval_batch_size=64,
        log_every=20, eval_every=20 * steps_per_epoch, checkpoint_every=5 * steps_per_epoch,
        keep_checkpoints=3, nan_guard=True, data_threads=8, data_prefetch=4,
        loss_weights=(1250.0, 1.0, 2.0, 2.0),
        direction_sigma=0.0))  # degrees; 0 = hard direction targets, as the original

    c.optim = ConfigDict(dict(
        lr=1e-3 * batch / 256, min_lr=1e-6, warmup_steps=10 * steps_per_epoch, total_steps=0,
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=5e-4, layer_decay=0.75, max_grad_norm=0.0,
        # What trains (regex over '/'-joined parameter paths); pos_embed is fixed, as in the original.
        trainable=".*", frozen="pos_embed",
        # No weight decay on biases and norm scales (PyTorch's 1-D parameters).
        no_decay=r".*(bias|scale)"))

    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.init = ConfigDict(dict(checkpoint=""))  # a converted checkpoint (launch/convert.py) to start from
    return c
