"""Shared building blocks: one attention, MLP, norms, LoRA, logical-axis helpers, block remat."""
from jaxaudio.layers.attention import MultiHeadAttention, dot_product_attention
from jaxaudio.layers.dense import Dense, Mlp, PatchEmbed, activation, dense
from jaxaudio.layers.lora import LoraConfig, lora
from jaxaudio.layers.norms import BatchNorm, RMSNorm, layer_norm
from jaxaudio.layers.partitioning import DEFAULT_RULES, MESH_AXES, constrain, param
from jaxaudio.layers.remat import remat_block
from jaxaudio.layers.transformer import DropPath, PreNormBlock
