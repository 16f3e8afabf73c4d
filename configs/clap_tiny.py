"""The embedded CLAP default: a tiny CLAP trained from scratch on generated captioned sounds
(`jaxaudio.data.clap_corpus`), in minutes on 2 CPU cores.

Same code, front end and loss as `configs/clap.py`; the sizes shrink: 1-second clips at
48 kHz (101 frames of 32 Slaney mel bins, stretched to 128 and folded to 64x64), a two-stage
32-wide HTSAT with window 8, a 2-layer 64-wide text encoder over a byte-level BPE trained
on the captions, a 64-d joint space. Unfused: the clips never pass the 1 s maximum.
"""
from configs import clap


def get_config():
    c = clap.get_config("unfused")
    c.seed = 0
    c.model.audio.update(dict(num_mel_bins=32, spec_size=64, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                              window_size=8, drop_path_rate=0.0))
    c.model.text.update(dict(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                             max_position_embeddings=64, dropout=0.0, attention_dropout=0.0))
    c.model.update(dict(projection_dim=64, dtype="float32"))
    c.data.update(dict(generate=True, root="data_cache/clap_tiny", num_train=2000, num_eval=300, seed=0,
                       num_workers=2, clip_seconds=1.0, max_text_len=32, class_template=""))
    c.data.features.update(dict(num_mel_bins=32, max_length_s=1.0))
    c.train.update(dict(steps=1000, batch_size=64, eval_batch_size=100, log_every=25, eval_every=500,
                        checkpoint_every=250, data_threads=2, data_prefetch=2))
    c.optim.update(dict(lr=1e-3, warmup_steps=100, total_steps=0, weight_decay=0.0))
    c.mesh.update(dict(data=-1))
    return c
