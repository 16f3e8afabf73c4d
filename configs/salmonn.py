"""SALMONN's original sizes and hyperparameters, shared by configs/salmonn_13b.py and
configs/salmonn_7b.py (which add the LLM); see those files for the commands.

Model (bytedance/SALMONN `configs/config.yaml`): whisper-large-v2 encoder (1280 wide, 32
layers) and BEATs iter3+ AS2M (768 wide, 12 layers), both frozen; ln_speech / ln_audio,
the window-level Q-Former (2 BERT-base layers with cross-attention in each, 1 query per
17-frame window = 1/3 s, 88 audio tokens per 30 s), speech_llama_proj to the LLM width;
the LLM frozen with LoRA r 8 / alpha 32 / dropout 0.1 on q_proj and v_proj.
Training: AdamW (0.9, 0.999), weight decay 0.05 except norms and biases, lr warmed up from
1e-6 to 3e-5 over 3000 steps, then LAVIS' cosine to 1e-5 over 30 x 3000 steps; batch 8
(per GPU in the original; the global batch here), no clipping, texts of at most 300
tokens. Decoding: beam 4, 200 new tokens.

The stages differ only in their data (`data.train_json`; the released
`salmonn_stage{1,2,3}_data.json`): 1 = ASR + captioning, 2 = instruction tuning, 3 =
activation tuning. Stage N > 1 starts from stage N-1's run.

Memory: each part's `remat` ("none", "full", "dots", "dots_no_batch"; WORKSPACE.md, Memory)
rematerialises its blocks in the backward pass, e.g. `--config.model.llm.remat=full` for 16 GiB
chips: gradients reach the connector through every LLM layer. Frozen encoders (behind a
stop-gradient) keep no activations, so their `remat` matters only with `freeze_whisper` /
`freeze_beats` off.
The LLM and Whisper run under `nn.scan` (`scan_layers`: one compiled block; checkpoints of
either layout load). What fits where, with `optim.frozen_storage` (bf16 or int8): README,
"Will it fit?"; check a setting with `python -m launch.aot`.
"""
from ml_collections import ConfigDict

from jaxaudio.models.salmonn import DEFAULT_LORA

WHISPER_LARGE_V2 = dict(num_mel_bins=80, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                        encoder_ffn_dim=5120, max_source_positions=1500)
# BEATs defaults are the iter3+ AS2M fine-tuned checkpoint's; SALMONN skips its predictor.
BEATS_ITER3_PLUS = dict(finetuned_model=False)
CONNECTOR = dict(num_queries=1, second_per_window=0.333333, second_stride=0.333333, hidden_size=768, num_layers=2,
                 num_heads=12, intermediate_size=3072, fusion_eps=1e-5, eps=1e-12, dropout=0.1,
                 attention_dropout=0.1)
STAGES = (1, 2, 3)
NO_REMAT = dict(remat="none")  # listed so that `--config.model.<part>.remat=...` can set it


def base_config(stage: str | None, llm: dict, name: str) -> ConfigDict:
    stage = int(stage or 1)
    if stage not in STAGES:
        raise ValueError(f"configs/{name}.py:{stage}: the training stage is 1, 2 or 3")
    c = ConfigDict()
    c.task = "salmonn"
    c.seed = 42
    c.stage = stage
    c.model = ConfigDict(dict(
        whisper=dict(NO_REMAT, scan_layers=True, **WHISPER_LARGE_V2), beats=dict(NO_REMAT, **BEATS_ITER3_PLUS),
        connector=dict(NO_REMAT, **CONNECTOR), llm=dict(NO_REMAT, scan_layers=True, **llm),
        lora=dict(DEFAULT_LORA), chunk_seconds=30.0, freeze_whisper=True, freeze_beats=True,
        dtype="bfloat16", param_dtype="float32"))
    c.data = ConfigDict(dict(
        generate=False, root="data_cache/salmonn", num_train=0, num_eval=0, seed=0, num_workers=0,
        # The stage's annotation files (comma-separated) and the original's prompt files.
        train_json=f"data/salmonn_stage{stage}_data.json", eval_json="", audio_root="",
        train_prompts="prompts/train_prompt.json", test_prompts="prompts/test_prompt.json",
        tasks="", eval_tasks="",  # "": every task in the files
        tokenizer="converted/vicuna/tokenizer", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
        max_seconds=30.0,  # one Whisper window, as the original; longer audio -> more windows
        max_txt_len=300, max_len=360, max_prompt_len=64, eval_limit=0))
    c.train = ConfigDict(dict(
        steps=90_000, batch_size=8, accum_steps=1, eval_batch_size=8, log_every=5, eval_every=3000,
        checkpoint_every=3000, keep_checkpoints=3, nan_guard=True, data_threads=8, data_prefetch=4))
    c.eval = ConfigDict(dict(num_beams=4, max_new_tokens=200, lora_scale=None))
    c.optim = ConfigDict(dict(
        schedule="lavis", lr=3e-5, min_lr=1e-5, warmup_start_lr=1e-6, warmup_steps=3000, total_steps=0,
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, max_grad_norm=0.0,
        trainable=r".*(connector|lora_[ab]).*", frozen="",
        # "llm=bfloat16,whisper=bfloat16,beats=bfloat16": the frozen weights in bf16 (see launch/aot.py);
        # "llm=int8": the LLM's frozen Dense kernels in int8 + per-channel scales (a quarter), the rest bf16
        frozen_storage="", no_decay=r".*(bias|scale)"))
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.init = ConfigDict(dict(
        checkpoint="" if stage == 1 else f"workdir/{name}/stage{stage - 1}",
        whisper="converted/whisper_large_v2", beats="converted/beats_iter3_plus", llm=f"converted/{name}_llm"))
    return c
