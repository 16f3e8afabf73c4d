"""`jaxaudio.generate` against `LlamaForCausalLM.generate(do_sample=False)` on a tiny random model.

The token ids must be equal: greedy and beam search (4 beams), a left-padded batch of
prompts of different lengths, EOS stopping, prompts given as token ids or as an
`inputs_embeds` prefix (random "audio" vectors in front of token embeddings). The EOS
token is one the free-running model emits mid-sequence, so some hypotheses end early.
Sequences are padded with `PAD` after EOS; Hugging Face's output is padded the same way
to `N` tokens when it stopped early.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxaudio.convert.hf import convert_hf
from jaxaudio.generate import generate
from jaxaudio.models.llama import Llama
from models.test_llama import hf_model  # tests/ is on sys.path

B, P, N, V = 3, 6, 10, 128
PAD_LEFT = (0, 2, 4)
PAD = 1  # not 0: HF's beam search fills with eos_token_id[0] when pad_token_id is 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf = hf_model(seed=11)
    path = str(tmp_path_factory.mktemp("llama_gen"))
    hf.save_pretrained(path)
    variables, config = convert_hf(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, V, (B, P))
    mask = np.ones((B, P), np.int64)
    for i, n in enumerate(PAD_LEFT):
        mask[i, :n] = 0
        ids[i, :n] = PAD
    free = _hf_generate(hf, dict(input_ids=ids, attention_mask=mask), 1, eos=None)
    eos = int(free.sequences[0, P + 4])  # emitted 5th by example 0; beam search ends hypotheses on it too
    return dict(hf=hf, model=Llama(**config["kwargs"]), params=variables["params"], ids=ids, mask=mask, eos=eos)


def _hf_generate(hf, inputs, num_beams, eos, length_penalty=1.0):
    with torch.no_grad():
        return hf.generate(**{k: torch.as_tensor(v) for k, v in inputs.items()}, do_sample=False, num_beams=num_beams,
                           max_new_tokens=N, eos_token_id=eos, pad_token_id=PAD, length_penalty=length_penalty,
                           return_dict_in_generate=True, output_scores=True, output_logits=True)


def _new_tokens(out, prompt_len):
    """HF's generated part, padded to N."""
    new = out.sequences[:, prompt_len:].numpy()
    return np.pad(new, ((0, 0), (0, N - new.shape[1])), constant_values=PAD)


def _audio_prefix(setup):
    """4 random vectors then the prompt's token embeddings, left-padded as a whole."""
    embed = np.asarray(setup["params"]["embed_tokens"]["embedding"])
    audio = (0.3 * np.random.default_rng(1).standard_normal((B, 4, embed.shape[1]))).astype(np.float32)
    prefix = np.concatenate([audio, embed[setup["ids"][:, 4:]]], axis=1)  # [B, 6, hidden]
    mask = np.ones((B, P), np.int64)
    mask[2, :1] = 0
    prefix[2, :1] = 0.0
    return prefix, mask


def _check_against_hf(setup, inputs, num_beams, eos, prompt_len, length_penalty=1.0):
    ref = _hf_generate(setup["hf"], inputs, num_beams, eos, length_penalty)
    ours_inputs = {k: jnp.asarray(v) for k, v in inputs.items()}
    out = generate(setup["model"], setup["params"], **ours_inputs, max_new_tokens=N, eos_token_id=eos,
                   pad_token_id=PAD, num_beams=num_beams, length_penalty=length_penalty)
    chex.assert_shape([out.tokens, out.lengths, out.scores], [(B, N), (B,), (B,)])
    chex.assert_type([out.tokens, out.lengths, out.scores], [jnp.int32, jnp.int32, jnp.float32])
    want = _new_tokens(ref, prompt_len)
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    eos_ids = [eos] if isinstance(eos, int) else eos
    for row, n in zip(np.asarray(out.tokens), np.asarray(out.lengths)):  # pad after EOS
        if n < N:
            assert row[n - 1] in eos_ids and (row[n:] == PAD).all()
    return out, ref


def _ended_on_eos(out, eos_ids) -> list[bool]:
    return [bool(row[n - 1] in eos_ids) for row, n in zip(np.asarray(out.tokens), np.asarray(out.lengths))]


def test_greedy_matches_transformers(setup):
    inputs = dict(input_ids=setup["ids"], attention_mask=setup["mask"])
    out, ref = _check_against_hf(setup, inputs, 1, setup["eos"], P)
    lengths = np.asarray(out.lengths)
    assert lengths.min() < N and lengths.max() == N, lengths  # EOS stopped some, not all
    # Scores: the summed log-probs of the chosen tokens under HF's logits.
    logp = torch.log_softmax(torch.stack(ref.logits, 1), -1).numpy()
    chosen = np.take_along_axis(logp, _new_tokens(ref, P)[:, :logp.shape[1], None], -1)[..., 0]
    want = np.array([chosen[i, :n].sum() for i, n in enumerate(lengths)])
    err = np.abs(np.asarray(out.scores) - want).max()
    assert err <= 1e-4, f"greedy score max abs error {err:.2e} > 1e-4"


def test_beam_search_matches_transformers(setup):
    inputs = dict(input_ids=setup["ids"], attention_mask=setup["mask"])
    out, ref = _check_against_hf(setup, inputs, 4, setup["eos"], P)
    err = np.abs(np.asarray(out.scores) - ref.sequences_scores.numpy()).max()
    assert err <= 1e-4, f"beam sequence score max abs error {err:.2e} > 1e-4"
    assert any(_ended_on_eos(out, [setup["eos"]]))


def test_beam_search_two_eos_and_length_penalty(setup):
    """Two EOS ids widen the candidate set (3 x beams); a length penalty of 2 favours long hypotheses."""
    inputs = dict(input_ids=setup["ids"], attention_mask=setup["mask"])
    out, ref = _check_against_hf(setup, inputs, 4, [setup["eos"], 7], P, length_penalty=2.0)
    err = np.abs(np.asarray(out.scores) - ref.sequences_scores.numpy()).max()
    assert err <= 1e-4, f"beam sequence score max abs error {err:.2e} > 1e-4"
    assert any(_ended_on_eos(out, [setup["eos"], 7]))


@pytest.mark.parametrize("num_beams", [1, 4])
def test_inputs_embeds_prefix_matches_transformers(setup, num_beams):
    prefix, mask = _audio_prefix(setup)
    _check_against_hf(setup, dict(inputs_embeds=prefix, attention_mask=mask), num_beams, setup["eos"], 0)


def test_sampling_jit_and_eager_agree(setup):
    """`do_sample` draws from the softmax with the given key: the same key, the same tokens,
    compiled or not (the eager run executes the while loop op by op)."""
    kw = dict(input_ids=jnp.asarray(setup["ids"]), attention_mask=jnp.asarray(setup["mask"]), max_new_tokens=3,
              eos_token_id=setup["eos"], pad_token_id=PAD, do_sample=True, rng=jax.random.PRNGKey(3))
    jitted = generate(setup["model"], setup["params"], **kw)
    with jax.disable_jit():
        eager = generate(setup["model"], setup["params"], **kw)
    chex.assert_shape([jitted.tokens, eager.tokens], [(B, 3), (B, 3)])
    chex.assert_trees_all_close(jitted, eager, atol=1e-4)
    assert ((np.asarray(jitted.tokens) >= 0) & (np.asarray(jitted.tokens) < V)).all()
    other = generate(setup["model"], setup["params"], **{**kw, "rng": jax.random.PRNGKey(4)})
    assert not np.array_equal(np.asarray(other.tokens), np.asarray(jitted.tokens))


def test_bad_arguments(setup):
    m, p = setup["model"], setup["params"]
    ids = jnp.asarray(setup["ids"])
    with pytest.raises(ValueError, match="exactly one"):
        generate(m, p, input_ids=ids, inputs_embeds=jnp.zeros((B, P, 64)), max_new_tokens=2, eos_token_id=2,
                 pad_token_id=PAD)
    with pytest.raises(NotImplementedError, match="num_beams=1"):
        generate(m, p, input_ids=ids, max_new_tokens=2, eos_token_id=2, pad_token_id=PAD, num_beams=2,
                 do_sample=True, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="needs rng"):
        generate(m, p, input_ids=ids, max_new_tokens=2, eos_token_id=2, pad_token_id=PAD, do_sample=True)


def test_text_round_trip_with_a_trained_tokenizer(setup):
    """Text in, text out: a tiny BPE tokenizer trained here with `tokenizers` (no hub), the
    same left-padded prompts through transformers and through us, decoded to equal strings."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    corpus = ["where is the dog barking", "the dog barks on the left", "how far is the bell",
              "a bell rings far away on the right", "is the sound near or far"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=V, special_tokens=["<unk>", "<pad>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                        padding_side="left")
    assert tokenizer.pad_token_id == PAD and len(tokenizer) <= V
    batch = tokenizer(["where is the dog", "how far is the bell on the right"], padding=True, return_tensors="np")
    eos = tokenizer.eos_token_id
    want = _hf_generate(setup["hf"], dict(batch), 1, eos)
    got = generate(setup["model"], setup["params"], input_ids=jnp.asarray(batch["input_ids"]),
                   attention_mask=jnp.asarray(batch["attention_mask"]), max_new_tokens=N, eos_token_id=eos,
                   pad_token_id=PAD)
    prompt_len = batch["input_ids"].shape[1]
    want_text = tokenizer.batch_decode(_new_tokens(want, prompt_len), skip_special_tokens=True)
    got_text = tokenizer.batch_decode(np.asarray(got.tokens), skip_special_tokens=True)
    assert got_text == want_text and any(got_text)
