"""AudioBERT at the original's sizes and settings (HJ-Ok/AudioBERT; reference/audiobert.md).

    configs/audiobert.py:animal      animal sound recognition (one span per sentence)
    configs/audiobert.py:pitch       sound pitch comparison (two spans)
    configs/audiobert.py:detector    the auditory-span detector (BertForTokenClassification)
    add "_text" (animal_text, pitch_text) for the text-only row: the same LoRA training, nothing injected

bert-base-uncased with LoRA r 64 / alpha 128 / dropout 0.01 on every query/key/value, the
AST `MIT/ast-finetuned-audioset-10-10-0.4593` (trained, as the original: its freeze lines are
commented out; `--config.model.freeze_ast=True` freezes it and caches each retrieved clip's
vector, so a step runs no AST), CLAP `laion/clap-htsat-fused` for retrieval; 20 epochs, batch 32, AdamW
lr 3e-4 (weight decay 0.01, torch's default), cosine with 10% warm-up, clipping at 1.0,
seed 42, 128 tokens. The animal script's own defaults were batch 8 / lr 1e-4; the README
and the paper say 32 / 3e-4, used here for both. The detector: 5 epochs, batch 16, AdamW
lr 1e-5 without a schedule, on the animal and pitch training CSVs together.

Paths to fill: `init.checkpoint` (`launch.convert --model=audiobert --bert=bert-base-uncased
--ast=ast-finetuned-audioset-10-10-0.4593 [--lora=animal_42_LORA.pt] --clap=clap-htsat-fused
--output=OUT`; or `init.bert` / `init.ast`, converted separately), `data.tokenizer`
(bert-base-uncased's folder), the CSVs (`data.root`), `retrieval.clap_checkpoint=OUT/clap`
with `retrieval.clap_config` (`configs/clap.py:fusion` for the fused CLAP; its
`data.tokenizer` must point at the CLAP folder's RoBERTa tokenizer), `retrieval.index` (an
index of the candidate clips, `launch.index build`) and `eval.detector` (a detector run).
"""
from ml_collections import ConfigDict

BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                 hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2, eps=1e-12, dropout=0.1,
                 attention_dropout=0.1)
AST_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                layer_norm_eps=1e-12, patch_size=16, frequency_stride=10, time_stride=10, max_length=1024,
                num_mel_bins=128, num_labels=0)
LORA = dict(targets=r"bert/layers_\d+/attention/(query|key|value)", rank=64, alpha=128.0, dropout=0.01)
SIZES = {"animal": (4211, 20), "pitch": (8312, 20)}  # training rows, epochs


def base(stage: str, bert: dict, ast: dict, root: str) -> ConfigDict:
    task = stage.removesuffix("_text")
    if task not in ("animal", "pitch", "detector"):
        raise ValueError(f"stage {stage!r}: choose animal, pitch, detector, animal_text or pitch_text")
    c = ConfigDict()
    c.stage = stage
    c.seed = 42
    c.task = "audiobert_detector" if task == "detector" else "audiobert"
    text_only = stage.endswith("_text")
    c.model = ConfigDict(dict(bert=dict(bert, head="mlm", pooler=False), ast=dict(ast), lora=dict(LORA),
                              injection="single" if text_only else "double", gate="always" if text_only else "span",
                              freeze_ast=False, dtype="float32", param_dtype="float32"))
    csv = {"animal": "{root}/animal_%s.csv", "pitch": "{root}/pitch_%s.csv"}
    c.data = ConfigDict(dict(
        task=task if task != "detector" else "animal", generate=False, root=root, seed=0, max_len=128,
        tokenizer="", text_only=text_only,
        train_csv=(csv["animal"] % "train" + "," + csv["pitch"] % "train") if task == "detector" else
        csv[task] % "train",
        eval_csv=(csv["animal"] % "test" + "," + csv["pitch"] % "test") if task == "detector" else
        csv[task] % "test"))
    c.retrieval = ConfigDict(dict(clap_config="configs/clap.py:fusion", clap_workdir="", clap_checkpoint="",
                                  index="", cache=""))
    rows, epochs = SIZES.get(task, (4211 + 8312, 5))
    batch = 16 if task == "detector" else 32
    steps = epochs * -(-rows // batch)
    c.train = ConfigDict(dict(steps=steps, batch_size=batch, accum_steps=1, eval_batch_size=64, log_every=50,
                              eval_every=-(-rows // batch), checkpoint_every=-(-rows // batch), keep_checkpoints=2,
                              nan_guard=True, data_threads=8, data_prefetch=4, loss_positions="all"))
    detector = task == "detector"
    c.optim = ConfigDict(dict(
        lr=1e-5 if detector else 3e-4, min_lr=1e-5 if detector else 0.0, warmup_steps=0 if detector else steps // 10,
        total_steps=0, b1=0.9, b2=0.999, eps=1e-8,
        # torch.optim.AdamW's default decay (AudioBERT); transformers' AdamW (the detector) has none.
        weight_decay=0.0 if detector else 0.01,
        layer_decay=1.0, max_grad_norm=0.0 if detector else 1.0,
        # Only LoRA and AST train (PEFT freezes all of BERT, its MLM head included); the detector trains all.
        trainable=".*" if detector else r"(.*/lora_[ab]|ast/.*|audio_proj/.*)", frozen="",
        no_decay=r"(?!)"))
    c.eval = ConfigDict(dict(detector=""))
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.init = ConfigDict(dict(checkpoint="", bert="", ast="", fresh="params/classifier/.*" if detector else ""))
    return c


def get_config(stage: str = "animal") -> ConfigDict:
    return base(stage, BERT_BASE, AST_BASE, "data/auditorybench")
