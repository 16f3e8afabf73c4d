"""SALMONN-13B: configs/salmonn.py with Vicuna-13B v1.1 (5120 wide, 40 layers).

    python -m launch.convert --model=salmonn --whisper=whisper-large-v2 \
        --beats=BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt --vicuna=vicuna-13b-v1.1 \
        --salmonn=salmonn_v1.pth --output=converted/salmonn_13b
    python -m launch.infer --config=configs/salmonn_13b.py --checkpoint=converted/salmonn_13b \
        --audio=speech.wav --prompt="Recognize the speech and give me the transcription."
    python -m launch.evaluate --config=configs/salmonn_13b.py --checkpoint=converted/salmonn_13b \
        --config.data.eval_json=librispeech_test_clean.json
    # training, stage by stage (each from the previous stage's run; stage 1 from the parts):
    python -m launch.train --config=configs/salmonn_13b.py:1 --workdir=workdir/salmonn_13b/stage1

`data.tokenizer` is Vicuna's tokenizer directory (tokenizer.model; read with
transformers' slow LlamaTokenizer, as the original).
"""
from configs.salmonn import base_config

VICUNA_13B = dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=40, rms_norm_eps=1e-6, rope_theta=10000.0,
                  max_position_embeddings=2048, tie_word_embeddings=False)


def get_config(stage: str | None = None):
    return base_config(stage, VICUNA_13B, "salmonn_13b")
