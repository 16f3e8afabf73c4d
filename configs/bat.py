"""BAT at the original's size and hyperparameters (SLAM-LLM `seld_spatialsoundqa`).

    python -m launch.train --config=configs/bat.py:1 --workdir=workdir/bat/stage1 \
        --config.data.tokenizer=Llama-2-7b-hf/tokenizer.json --config.data.train_json=... (see data)
    python -m launch.train --config=configs/bat.py:2 --workdir=workdir/bat/stage2 ...   # from stage 1
    python -m launch.train --config=configs/bat.py:3 --workdir=workdir/bat/stage3 ...   # from stage 2

The suffix `:N` is the curriculum stage (default 1): stage 1 = question types A+B
(`stage1-clsdoa`), 2 = A-D (`stage2-single`), 3 = A-E (`stage3-mixup`). Stage N > 1
starts from stage N-1's run (`init.checkpoint = workdir/bat/stage{N-1}`); stage 1 starts
from a converted Spatial-AST (`init.encoder`, `launch/convert.py --model=spatial_ast`) and
a converted LLaMA-2 7B (`init.llm`, `launch/convert.py --source=Llama-2-7b-hf`).

Model: ViT-B Spatial-AST (frozen; its 515 tokens), an 8-layer Q-Former with 64 queries ->
Linear 768 -> 4096 -> LayerNorm, LLaMA-2 7B (frozen) with LoRA r 8 / alpha 32 / dropout
0.05 on q_proj and v_proj. Training: AdamW lr 1e-4, 20k linear warm-up steps then held,
200k steps of batch 8, validation every 2000 steps, texts of at most 96 tokens; decoding
with beam 4 and 200 new tokens. Weight decay 0 and no clipping are SLAM-LLM's defaults
[unverified for the BAT run].

Memory: each part's `remat` ("none", "full", "dots", "dots_no_batch"; WORKSPACE.md, Memory)
rematerialises its blocks in the backward pass, e.g. `--config.model.llm.remat=full` for 16 GiB
chips: gradients reach the projector through every LLM layer, whose activations dominate. The
frozen encoder (behind a stop-gradient) keeps no activations, so its `remat` changes nothing.
The LLM runs under `nn.scan` (`scan_layers`: one compiled block; checkpoints of
either layout load). What fits where, with `optim.frozen_storage` (bf16 or int8): README,
"Will it fit?"; check a setting with `python -m launch.aot`.

Official data (`data.generate=False`): `train_json` / `eval_json` (comma-separated files:
`eval-stage1-classification.json,eval-stage1-doa.json`, ...), the `train_` / `eval_
reverberation.json` of `mp3d_reverb.zip`, its folder (`reverb_root`, holding `binaural/`),
the AudioSet clips (`audio_root`) and LLaMA-2's `tokenizer.json`.
"""
from ml_collections import ConfigDict

from configs import spatial_ast
from jaxaudio.models.bat import DEFAULT_LORA

STAGE_FOLDERS = {1: "stage1-clsdoa", 2: "stage2-single", 3: "stage3-mixup"}


def encoder_kwargs(spatial_ast_model: ConfigDict) -> dict:
    """A Spatial-AST config's `model` section as `Bat`'s encoder kwargs (Bat sets dtypes)."""
    kw = spatial_ast_model.to_dict()
    kw.pop("dtype", None)
    kw.pop("param_dtype", None)
    return kw


def get_config(stage: str | None = None) -> ConfigDict:
    stage = int(stage or 1)
    if stage not in STAGE_FOLDERS:
        raise ValueError(f"configs/bat.py:{stage}: the curriculum stage is 1, 2 or 3")
    c = ConfigDict()
    c.task = "bat"
    c.seed = 0
    c.stage = stage

    c.model = ConfigDict(dict(
        encoder=encoder_kwargs(spatial_ast.get_config().model),
        projector=dict(num_queries=64, hidden_size=768, num_layers=8, num_heads=12, intermediate_size=3072,
                       cross_attention_frequency=2, eps=1e-12, norm_eps=1e-5, dropout=0.1, attention_dropout=0.1,
                       remat="none"),
        llm=dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=4096, tie_word_embeddings=False, remat="none",
                 scan_layers=True),
        lora=dict(DEFAULT_LORA),
        dtype="bfloat16", param_dtype="float32"))

    c.data = ConfigDict(dict(
        generate=False, root="data_cache/SpatialAudio", num_train=0, num_eval=0, seed=0, num_workers=0,
        train_json="", eval_json="", train_reverb_json="", eval_reverb_json="", audio_root="", reverb_root="",
        ext_audio=".wav", eval_limit=0,
        # "" = `<root>/tokenizer.json` (trained on generated data); LLaMA-2's for the official run.
        tokenizer="", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
        max_len=96, clip_seconds=10.0,
        rir_seconds=0.0))  # 0: the whole RIR, as SLAM-LLM (Spatial-AST cuts it to 2 s)

    c.train = ConfigDict(dict(
        steps=200_000, batch_size=8, accum_steps=1, eval_batch_size=8, log_every=50, eval_every=2000,
        checkpoint_every=2000, keep_checkpoints=3, nan_guard=True, data_threads=8, data_prefetch=4))
    c.eval = ConfigDict(dict(num_beams=4, max_new_tokens=200))

    c.optim = ConfigDict(dict(
        # min_lr = lr: after the warm-up the rate is held, as SLAM-LLM's scheduler does.
        lr=1e-4, min_lr=1e-4, warmup_steps=20_000, total_steps=0, b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=0.0, max_grad_norm=0.0,
        trainable=r".*(projector|lora_[ab]).*", frozen="",
        # "llm=bfloat16,encoder=bfloat16": the frozen weights in bf16 (half the memory; see launch/aot.py);
        # "llm=int8": the LLM's frozen Dense kernels in int8 + per-channel scales (a quarter), the rest bf16
        frozen_storage="", no_decay=r".*(bias|scale)"))

    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.init = ConfigDict(dict(
        # A whole BAT: a previous stage's workdir or a converted BAT (launch/convert.py --model=bat).
        checkpoint="" if stage == 1 else f"workdir/bat/stage{stage - 1}",
        # Used when `checkpoint` is empty: the parts' own checkpoints (workdir or converted).
        encoder="converted/spatial_ast", llm="converted/llama2_7b"))
    return c
