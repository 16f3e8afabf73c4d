"""Block rematerialisation (`jaxaudio.layers.remat`): every stack, every policy.

Every family (tiny sizes): with each policy the parameter tree is the plain model's, and
the forward holds one `checkpoint` per block with that policy (a jaxpr, no compile). One
family per kind of block (pre-LN ViT block, BEATs, BERT, LLaMA, Q-Former, Swin) also runs,
one program per family: parameters from the same init rng equal the plain model's; outputs
and parameter gradients of every policy equal the plain model's. LLaMA runs with LoRA (its
interceptor, dropout and a traced per-example scale inside the recomputed blocks). Then:
unknown names, old bool values, the systems' parts and the paper configs, and what each
policy saves for a 4-layer LLaMA, in JAX's residuals and in XLA's temp buffer.
"""
import contextlib
import functools
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaudio.layers.lora import LoraConfig, lora
from jaxaudio.layers.remat import POLICIES, remat_block, remat_policy
from jaxaudio.models.ast import AST
from jaxaudio.models.beats import BEATs
from jaxaudio.models.bert import Bert
from jaxaudio.models.clap import HTSAT
from jaxaudio.models.llama import Llama
from jaxaudio.models.qformer import BatProjector, SalmonnConnector
from jaxaudio.models.spatial_ast import SpatialAST
from jaxaudio.models.whisper import WhisperEncoder

REMAT = tuple(p for p in POLICIES if p != "none")
RNG = np.random.default_rng(0)
LORA = LoraConfig(targets=r"layers_\d+/attn/(query|value)", rank=2, dropout=0.1)


def _normal(*shape):
    return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def _ids(*shape):
    return jnp.asarray(RNG.integers(0, 40, shape), jnp.int32)


# name -> (module class, kwargs, blocks, inputs, call: (module, variables, inputs, rngs) -> array).
FAMILIES = {
    "whisper": (WhisperEncoder, dict(num_mel_bins=16, d_model=32, encoder_layers=1, encoder_attention_heads=2,
                                     encoder_ffn_dim=64, max_source_positions=8, dropout=0.1), 1,
                (_normal(2, 16, 16),), lambda m, v, x, r: m.apply(v, *x, train=True, rngs=r)),
    "beats": (BEATs, dict(embed_dim=16, encoder_layers=1, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
                          encoder_attention_heads=4, conv_pos=4, conv_pos_groups=4, num_buckets=16, max_distance=32,
                          finetuned_model=False), 1,
              (0.1 * _normal(2, 4000),), lambda m, v, x, r: m.apply(v, *x)[0]),  # 8 tokens
    "bert": (Bert, dict(vocab_size=40, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                        max_position_embeddings=16, head="mlm"), 1,
             (_ids(2, 12), jnp.asarray([[1] * 12, [1] * 8 + [0] * 4])),
             lambda m, v, x, r: m.apply(v, *x, deterministic=False, rngs=r).logits),
    "llama_lora": (Llama, dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2), 1,
                   (_ids(2, 12),), lambda m, v, x, r: m.apply(v, *x, rngs=r)),
    # Two layers: cross-attention in the first only.
    "bat_projector": (BatProjector, dict(llm_width=24, num_queries=4, hidden_size=32, num_layers=2, num_heads=4,
                                         intermediate_size=64, encoder_hidden_size=16), 2,
                      (_normal(2, 10, 16),), lambda m, v, x, r: m.apply(v, *x, deterministic=False, rngs=r)),
    # An 8 x 8 grid of 4 x 4 windows: the second block's are shifted.
    "htsat": (HTSAT, dict(num_mel_bins=8, spec_size=32, embed_dim=8, depths=(2,), num_heads=(2,), window_size=4,
                          dropout=0.1), 2,
              (_normal(2, 1, 100, 8),),
              lambda m, v, x, r: m.apply(v, *x, train=True, rngs=r, mutable=["batch_stats"])[0][1]),
    # Blocks of a kind that runs above (numbers not compared again: a program each costs ~7 s).
    "spatial_ast": (SpatialAST, dict(n_mels=32, target_frames=64, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                     mlp_ratio=2, num_classes=5), 2,
                    (0.1 * _normal(2, 2, 8000),), lambda m, v, x, r: m.apply(v, *x)["tokens"]),
    "ast": (AST, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8,
                      frequency_stride=8, time_stride=8, max_length=32, num_mel_bins=16, dropout=0.1), 2,
            (_normal(2, 32, 16),), lambda m, v, x, r: m.apply(v, *x, train=True, rngs=r)["last_hidden_state"]),
    "salmonn_connector": (SalmonnConnector, dict(speech_width=16, audio_width=8, llm_width=24,
                                                 second_per_window=0.1, second_stride=0.1, hidden_size=32,
                                                 num_layers=2, num_heads=4, intermediate_size=64), 2,
                          (_normal(2, 15, 16), _normal(2, 12, 8)),  # 3 windows of 5 frames
                          lambda m, v, x, r: m.apply(v, *x, deterministic=False, rngs=r)),
}
RUN = ("whisper", "beats", "bert", "llama_lora", "bat_projector", "htsat")
# unsafe_rbg: threefry's bit mixing (in dropout's fold_in too) takes seconds to compile on CPU.
KEY, LORA_SCALE = jax.random.key(0, impl="unsafe_rbg"), jnp.asarray([4.0, 0.0])


def _models(name):
    cls, kw = FAMILIES[name][:2]
    return {p: cls(**kw, remat=p) for p in POLICIES}


def _adapters(name, lora_scale):
    # AudioBERT's gate: LoRA on for one example, off for the other, as a traced value.
    return lora(LORA, scale=lora_scale, deterministic=False) if name == "llama_lora" else contextlib.nullcontext()


def _init(name, model, key, lora_scale):
    with _adapters(name, lora_scale):
        return nn.unbox(model.init(key, *FAMILIES[name][3]))


def _forward(name, model, variables, key, lora_scale):
    with _adapters(name, lora_scale):
        return FAMILIES[name][4](model, variables, FAMILIES[name][3], {"dropout": jax.random.fold_in(key, 1)})


def _checkpoint_policies(jaxpr) -> list:
    """The policy of every `jax.checkpoint` equation in `jaxpr`, nested ones included (told
    by its parameters: the primitive's name changes between jax versions)."""
    found = []
    for eqn in jaxpr.eqns:
        if {"policy", "prevent_cse"} <= set(eqn.params):
            found.append(eqn.params["policy"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += _checkpoint_policies(sub)
    return found


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_block_is_rematerialised_with_its_policy(name):
    models = _models(name)
    shapes = {p: jax.eval_shape(functools.partial(_init, name, m), KEY, LORA_SCALE) for p, m in models.items()}
    blocks = FAMILIES[name][2]
    for p, m in models.items():
        chex.assert_trees_all_equal_shapes_and_dtypes(shapes[p], shapes["none"])  # the same names
        jaxpr = jax.make_jaxpr(functools.partial(_forward, name, m))(shapes["none"], KEY, LORA_SCALE)
        assert _checkpoint_policies(jaxpr.jaxpr) == [POLICIES[p]] * (blocks if p != "none" else 0), (name, p)


@functools.lru_cache(maxsize=None)
def _run(name: str):
    """Variables from init for "none" and "full", and per policy (output, parameter
    gradients), all at the plain model's variables."""
    models = _models(name)

    # LLVM at -O0: a third less compile time; every policy shares the one program.
    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def run(key, lora_scale):
        # The policies differ in the backward pass only: init values are checked for one.
        inits = {p: _init(name, models[p], key, lora_scale) for p in ("none", "full")}
        ref = dict(inits["none"])
        ref["params"] = jax.tree.map(lambda a: a + 0.01, ref["params"])  # lora_b would be 0: no lora_a gradient

        def loss(params, model):
            out = _forward(name, model, {**ref, "params": params}, key, lora_scale)
            return jnp.sum(jnp.sin(out.astype(jnp.float32))), out
        grads = {}
        for p, m in models.items():
            (_, out), g = jax.value_and_grad(loss, has_aux=True)(ref["params"], m)
            grads[p] = (out, g)
        return inits, grads

    return run(KEY, LORA_SCALE)


def _assert_grads_close(got, want, what: str):
    """Leaf by leaf, max |got - want| <= 1e-6 of the leaf's largest |want| plus 1e-9 of the
    largest gradient: a recomputed block fuses differently (float32 rounding; seen up to
    6e-7 of a leaf). The floor is for leaves that are sums of larger terms: the key
    projection's bias (gradient 0 in exact arithmetic: softmax ignores a shift per query
    row; ~1e-10 of noise), LoRA's A behind a small B."""
    largest = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        bound = 1e-6 * float(jnp.max(jnp.abs(w))) + 1e-9 * largest
        err = float(jnp.max(jnp.abs(g - w)))
        assert err <= bound, f"{what}: gradient of {jax.tree_util.keystr(path)} differs by {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("name", RUN)
def test_parameters_outputs_and_gradients_do_not_change(name):
    inits, results = _run(name)
    chex.assert_trees_all_equal(inits["full"], inits["none"])  # names, shapes and values
    ref_out, ref_grads = results["none"]
    for p in REMAT:
        out, grads = results[p]
        np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-6, err_msg=f"{name} {p}: outputs")
        _assert_grads_close(grads, ref_grads, f"{name} {p}")
    if name == "llama_lora":
        assert any("lora_b" in jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(ref_grads))


def test_unknown_policy_names_the_field_and_the_choices():
    with pytest.raises(ValueError, match=r"Llama\.remat='dot'.*'none', 'full', 'dots', 'dots_no_batch'"):
        Llama(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
              remat="dot").init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"QFormer\.remat='everything'"):
        jax.eval_shape(BatProjector(llm_width=8, num_queries=1, hidden_size=8, num_layers=1, num_heads=2,
                                    intermediate_size=8, encoder_hidden_size=8, remat="everything").init,
                       jax.random.PRNGKey(0), jnp.zeros((1, 2, 8)))


def test_old_bool_values_and_the_plain_class():
    assert remat_policy(True) == "full" and remat_policy(False) == "none"
    assert remat_block(Llama, "none") is Llama and remat_block(Llama, False) is Llama
    assert remat_block(Llama, True) is remat_block(Llama, "full")  # one wrapper class per policy


def test_systems_pass_remat_to_their_parts():
    from jaxaudio.models.audiobert import AudioBert
    from jaxaudio.models.clap import Clap
    assert [m.remat for m in AudioBert(bert={"remat": "dots"}, ast={"remat": "full"}).parts()] == ["dots", "full"]
    assert [m.remat for m in Clap(audio={"remat": "full"}, text={"remat": True}).parts()] == ["full", True]


def test_paper_configs_list_remat_per_part():
    """`--config.model.<part>.remat=...` needs the key in the config (ml_collections sets no
    new keys, nor a str into a bool); from there the task builds the parts with it."""
    from configs import bat, salmonn_7b, spatial_ast
    from jaxaudio.models.bat import Bat
    from jaxaudio.models.salmonn import Salmonn
    from jaxaudio.tasks import audio_llm, salmonn as salmonn_task
    from jaxaudio.tasks.bat import model_kwargs as bat_kwargs
    assert spatial_ast.get_config().model.remat == "none"
    c = bat.get_config()
    for part, policy in zip(("encoder", "projector", "llm"), REMAT):
        assert c.model[part].remat == "none"
        c.model[part].remat = policy
    assert [m.remat for m in Bat(**bat_kwargs(c.model)).parts()] == list(REMAT)
    c = salmonn_7b.get_config()
    for part, policy in zip(("whisper", "beats", "connector", "llm"), REMAT + ("full",)):
        assert c.model[part].remat == "none"
        c.model[part].remat = policy
    kwargs = audio_llm.model_kwargs(c.model, salmonn_task.PARTS, salmonn_task.SCALARS)
    assert [m.remat for m in Salmonn(**kwargs).parts()] == list(REMAT + ("full",))


# 4 layers, 256 wide, batch 4 x 512 tokens: one layer's [4, 4, 512, 512] attention is 16 MiB.
BIG = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
BIG_IDS = jax.ShapeDtypeStruct((4, 512), jnp.int32)


def _big_loss(policy):
    model = Llama(**BIG, remat=policy)
    return lambda params, ids: jnp.mean(model.apply(params, ids) ** 2)


def _big_params():
    return jax.eval_shape(lambda: nn.unbox(Llama(**BIG).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))))


def test_what_each_policy_saves_for_the_backward_pass():
    """Bytes the backward pass keeps from the forward (the vjp's residuals, parameters
    included), without compiling: none 373 MiB, dots 164, dots_no_batch 92, full 28."""
    params = _big_params()

    def saved(policy):
        residuals = jax.eval_shape(lambda p, i: jax.vjp(functools.partial(_big_loss(policy), ids=i), p)[1],
                                   params, BIG_IDS)
        return sum(r.size * r.dtype.itemsize for r in jax.tree.leaves(residuals))

    mib = {p: saved(p) / 2 ** 20 for p in POLICIES}
    assert mib["full"] < mib["dots_no_batch"] < mib["dots"] < mib["none"], mib
    assert mib["full"] < 0.1 * mib["none"], mib


def test_full_remat_shrinks_the_compiled_backward_program():
    """XLA's temp buffer of `jax.grad` with and without "full", compiled by XLA:CPU's
    memory-minimising scheduler, the kind accelerators use: 237 MiB -> 69 MiB (dots_no_batch
    107; jax 0.10.2). The CPU default, a concurrency-optimised scheduler, runs the
    recomputation early and keeps nearly all of it (250 -> 238 MiB). The flag is read when
    the backend starts, so the programs compile in a subprocess."""
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                          "import test_remat as t; print(t.temp_bytes('none'), t.temp_bytes('full'))",
                          os.path.dirname(__file__)],
                         env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                         text=True, timeout=300, check=True).stdout.split()
    none, full = int(out[-2]), int(out[-1])
    assert full < 0.5 * none, (none, full)


def temp_bytes(policy: str) -> int:
    """The subprocess's side: the temp buffer of the big LLaMA's gradient program."""
    compiled = jax.jit(jax.grad(_big_loss(policy))).lower(_big_params(), BIG_IDS).compile()
    return compiled.memory_analysis().temp_size_in_bytes
