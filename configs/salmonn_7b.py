"""SALMONN-7B: configs/salmonn.py with Vicuna-7B v1.5 (4096 wide, 32 layers; the authors'
answer in SALMONN issue #39). Commands as in configs/salmonn_13b.py, with salmonn_7b.
"""
from configs.salmonn import base_config

VICUNA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=4096, tie_word_embeddings=False)


def get_config(stage: str | None = None):
    return base_config(stage, VICUNA_7B, "salmonn_7b")
