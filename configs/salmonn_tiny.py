"""The embedded default: a tiny SALMONN on generated speech and sounds, on 2 CPU cores.

    python -m launch.train --config=configs/salmonn_tiny.py:1 --workdir=workdir/salmonn_tiny/stage1
    python -m launch.train --config=configs/salmonn_tiny.py:2 --workdir=workdir/salmonn_tiny/stage2
    # activation data: the stage-2 model writes stories with a discounted LoRA scale
    python -m launch.infer --config=configs/salmonn_tiny.py:2 --workdir=workdir/salmonn_tiny/stage2 \
        --annotation=data_cache/salmonn_tiny/train.json --task=audio_story_telling --limit=64 \
        --lora_scale=2.0 --output=workdir/salmonn_tiny/activation.json
    python -m launch.train --config=configs/salmonn_tiny.py:3 --workdir=workdir/salmonn_tiny/stage3
    python -m launch.evaluate --config=configs/salmonn_tiny.py:2 --workdir=workdir/salmonn_tiny/stage2

Data: `data_cache/salmonn_tiny`, 2000 + 200 clips of 1-4 s (espeak-ng speech of a
59-word grammar for ASR and gender, procedural sounds for captions and QA; without
espeak-ng only the sound tasks). Stage 1 trains ASR + captioning, stage 2 adds gender
and QA, stage 3 (activation tuning) trains on the stories of the file above and is
evaluated on the stage-2 tasks (what it keeps of them).

Sizes: a 2-layer, 64-wide Whisper encoder and BEATs over 4 s windows (Whisper's 30 s
would be 7.5 times the compute for clips this short), a 2-layer, 64-wide window Q-Former
with 0.2 s windows (20 audio tokens per window; the original's 1/3 s gives 1 per 17
frames), a 2-layer, 128-wide LLaMA with a 512-token byte-level BPE trained on the
corpus. No pretrained encoders or LLM exist at this size: all are random, the encoders
and the LLM body stay frozen as in the original, and the LLM's output layer (`lm_head`,
the final norm) trains with the Q-Former and LoRA, as in configs/bat_tiny.py.
"""
from configs.salmonn import base_config

SIZES = dict(
    whisper=dict(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                 max_source_positions=200),
    beats=dict(embed_dim=32, encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
               encoder_attention_heads=4, conv_pos=16, conv_pos_groups=4, num_buckets=64, max_distance=128,
               finetuned_model=False),
    connector=dict(num_queries=1, second_per_window=0.2, second_stride=0.2, hidden_size=64, num_layers=2,
                   num_heads=4, intermediate_size=128, fusion_eps=1e-5, eps=1e-12, dropout=0.1,
                   attention_dropout=0.1),
    llm=dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
             tie_word_embeddings=False),
)


def get_config(stage: str | None = None):
    c = base_config(stage, SIZES["llm"], "salmonn_tiny")
    c.model.llm.scan_layers = c.model.whisper.scan_layers = False  # the unrolled names the tests read
    stage = c.stage
    c.model.update(dict(whisper=SIZES["whisper"], beats=SIZES["beats"], connector=SIZES["connector"],
                        chunk_seconds=4.0, dtype="float32"))
    c.data.update(dict(
        generate=True, root="data_cache/salmonn_tiny", num_train=2000, num_eval=200,
        train_json="workdir/salmonn_tiny/activation.json" if stage == 3 else "", train_prompts="", test_prompts="",
        tokenizer="", pad_token="<pad>", max_seconds=4.0, max_txt_len=48, max_len=64, max_prompt_len=48))
    c.train.update(dict(steps=1000, batch_size=16, eval_batch_size=50, log_every=50, eval_every=1000,
                        checkpoint_every=250, data_threads=2, data_prefetch=2))
    if stage == 3:  # a short tuning on a few long answers
        c.train.update(dict(steps=100, batch_size=8, eval_every=100, checkpoint_every=100))
    c.eval.update(dict(num_beams=4, max_new_tokens=32))
    c.optim.update(dict(lr=2e-3, min_lr=2e-4, warmup_start_lr=1e-5, warmup_steps=50, total_steps=0,
                        trainable=r".*(connector|lora_[ab]|llm/lm_head|llm/norm).*"))
    c.init.update(dict(whisper="", beats="", llm=""))
    return c
