"""CLAP at LAION's size and training settings: HTSAT-tiny + RoBERTa-base, 512-d joint space.

`get_config()` (or `configs/clap.py:fusion`) is `630k-audioset-fusion-best.pt` /
`laion/clap-htsat-fused`, the CLAP AudioBERT retrieves with: 4-channel fused input, HTK mel
without norm, clips over 10 s as three local crops plus the shrunk whole.
`configs/clap.py:unfused` is `630k-audioset-best.pt` / `laion/clap-htsat-unfused`:
1 channel, Slaney mel, a random 10 s crop.

Training follows LAION-CLAP's `train-htsat-roberta.sh`: Adam (no weight decay), lr 1e-4,
3200 warm-up steps then cosine, 45 epochs, 96 clips per GPU (8 GPUs: 768 a step), repeat-pad,
fp32, `--gather-with-grad` (the loss here always spans the global batch), logit scales
initialised to log(1/0.07) and clamped to [0, log 100] after each step. The epoch length
depends on the data; `train.steps` below is 45 epochs of AudioCaps + Clotho train
(~49k + ~3.8k clips) at 768.
Point `data.train_manifest` / `data.eval_manifest` (jsonl: audio, caption) at real data,
`data.tokenizer` at the RoBERTa tokenizer (the Hugging Face CLAP folder has it) and
`init.checkpoint` at a converted CLAP (`launch.convert`) to fine-tune.
"""
import math

from ml_collections import ConfigDict

# transformers' ClapTextConfig defaults = RoBERTa-base (LAION builds it from `roberta-base`,
# whose LayerNorm eps is 1e-5; the Hugging Face port says 1e-12: reference/clap.md §1).
ROBERTA_BASE = dict(vocab_size=50265, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                    hidden_act="gelu", max_position_embeddings=514, type_vocab_size=1, eps=1e-12, dropout=0.1,
                    attention_dropout=0.1, pooler=True)
HTSAT_TINY = dict(num_mel_bins=64, spec_size=256, patch_size=4, patch_stride=(4, 4), embed_dim=96,
                  depths=(2, 2, 6, 2), num_heads=(4, 8, 16, 32), window_size=8, mlp_ratio=4.0, qkv_bias=True,
                  eps=1e-5, aff_block_r=4, drop_path_rate=0.1, dropout=0.0, attention_dropout=0.0)


def get_config(variant: str = "fusion") -> ConfigDict:
    if variant not in ("fusion", "unfused"):
        raise ValueError(f"configs/clap.py:{variant}: choose 'fusion' or 'unfused'")
    fusion = variant == "fusion"
    c = ConfigDict()
    c.task = "clap"
    c.seed = 3407  # LAION's

    c.model = ConfigDict(dict(
        audio=dict(HTSAT_TINY, enable_fusion=fusion), text=dict(ROBERTA_BASE), projection_dim=512,
        logit_scale_init=math.log(1 / 0.07), pad_token_id=1, dtype="bfloat16", param_dtype="float32"))

    c.data = ConfigDict(dict(
        generate=False, root="data_cache/clap", num_train=0, num_eval=0, seed=0, num_workers=8,
        clip_seconds=10.0, train_manifest="", eval_manifest="", classes="",
        class_template="This is a sound of {}.",  # LAION's zero-shot prompt
        features=dict(sample_rate=48000, n_fft=1024, hop_length=480, num_mel_bins=64, f_min=50.0, f_max=14000.0,
                      max_length_s=10.0, truncation="fusion" if fusion else "rand_trunc", padding="repeatpad"),
        tokenizer="", bos_token="<s>", eos_token="</s>", pad_token="<pad>", max_text_len=77))

    batch = 768
    steps_per_epoch = (49_000 + 3_800) // batch
    c.train = ConfigDict(dict(
        steps=45 * steps_per_epoch, batch_size=batch, accum_steps=1, eval_batch_size=256, log_every=50,
        eval_every=5 * steps_per_epoch, checkpoint_every=steps_per_epoch, keep_checkpoints=3, nan_guard=True,
        data_threads=16, data_prefetch=4, loss_scale="laion"))

    c.optim = ConfigDict(dict(
        lr=1e-4, min_lr=0.0, warmup_steps=3200, total_steps=0, b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=0.0, layer_decay=1.0, max_grad_norm=0.0, trainable=".*", frozen="",
        no_decay=r".*(bias|scale|logit_scale_[at])",
        clamp=((r"logit_scale_[at]", 0.0, math.log(100.0)),)))

    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.init = ConfigDict(dict(checkpoint=""))
    return c
