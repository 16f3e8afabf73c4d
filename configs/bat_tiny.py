"""The embedded default: a tiny BAT on generated SpatialSoundQA, three stages on 2 CPU cores.

    python -m launch.train --config=configs/spatial_ast_tiny.py --workdir=workdir/spatial_ast_tiny
    python -m launch.train --config=configs/bat_tiny.py:1 --workdir=workdir/bat_tiny/stage1
    python -m launch.train --config=configs/bat_tiny.py:2 --workdir=workdir/bat_tiny/stage2
    python -m launch.train --config=configs/bat_tiny.py:3 --workdir=workdir/bat_tiny/stage3
    python -m launch.evaluate --config=configs/bat_tiny.py:3 --workdir=workdir/bat_tiny/stage3

The encoder is the Spatial-AST main job's (configs/spatial_ast_tiny.py, same sizes),
frozen. The projector is a 2-layer, 64-wide Q-Former with 16 queries; the LLM a 2-layer,
128-wide LLaMA with a 512-token byte-level BPE trained on the generated questions and
answers (one dataset of every question type; each stage reads its own types).

No pretrained LLM exists at this size, so the LLM is random and its body stays frozen as
the original's does, but its output layer (`lm_head` and the final norm) trains with the
projector and LoRA: through a random frozen output layer the logits stay nearly flat
(the answer-token loss stalls near 4.7 nats, against 0.35 when it trains).
"""
from ml_collections import ConfigDict

from configs import bat, spatial_ast_tiny


def get_config(stage: str | None = None) -> ConfigDict:
    c = bat.get_config(stage)
    stage = c.stage
    c.model.encoder = bat.encoder_kwargs(spatial_ast_tiny.get_config().model)
    c.model.projector = dict(num_queries=16, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                             cross_attention_frequency=2, eps=1e-12, norm_eps=1e-5, dropout=0.1,
                             attention_dropout=0.1)
    c.model.llm = dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=256, tie_word_embeddings=False, scan_layers=False)
    c.model.dtype = "float32"
    c.data.update(dict(generate=True, root="data_cache/bat_tiny", num_train=2000, num_eval=250, clip_seconds=1.0,
                       tokenizer="", pad_token="<pad>", max_len=64))
    c.train.update(dict(steps=500, batch_size=16, eval_batch_size=50, log_every=50, eval_every=500,
                        checkpoint_every=250, data_threads=2, data_prefetch=2))
    c.eval.update(dict(num_beams=4, max_new_tokens=24))
    c.optim.update(dict(lr=1e-3, min_lr=1e-3, warmup_steps=30, total_steps=0,
                        trainable=r".*(projector|lora_[ab]|llm/lm_head|llm/norm).*"))
    c.init.update(dict(checkpoint="" if stage == 1 else f"workdir/bat_tiny/stage{stage - 1}",
                       encoder="workdir/spatial_ast_tiny", llm=""))
    return c
