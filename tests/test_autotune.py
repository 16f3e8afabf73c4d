"""jaxaudio.autotune.compile_fastest: every candidate compiles and runs, the fastest is kept."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaudio.autotune import candidates, compile_fastest


def _matmul_gelu(a, b):
    return jax.nn.gelu(a @ b)


@pytest.fixture(scope="module")
def operands():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((64, 32)), jnp.float32),
            jnp.asarray(rng.standard_normal((32, 48)), jnp.float32))


def test_keeps_the_fastest_candidate_and_its_values(operands):
    lowered = jax.jit(_matmul_gelu).lower(*operands)
    tuned = compile_fastest(lowered, *operands, rounds=2)
    expected = np.asarray(_matmul_gelu(*operands))
    np.testing.assert_allclose(np.asarray(tuned.compiled(*operands)), expected, rtol=1e-5, atol=1e-5)
    assert set(tuned.seconds) | set(tuned.skipped) == set(candidates())
    assert tuned.compile_seconds > 0
    if len(tuned.seconds) > 1:  # more than one compiled: all were timed, the kept one is the fastest
        assert tuned.seconds[tuned.name] == min(tuned.seconds.values())
        assert all(t > 0 for t in tuned.seconds.values())
    else:
        assert tuned.seconds == {}


def test_cpu_candidates_give_the_same_values(operands):
    """Each CPU option set, alone, compiles on this jaxlib and computes the same function."""
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU candidates only")
    lowered = jax.jit(_matmul_gelu).lower(*operands)
    expected = np.asarray(_matmul_gelu(*operands))
    for name, opts in candidates("cpu").items():
        tuned = compile_fastest(lowered, *operands, options={name: opts})
        assert tuned.name == name and tuned.seconds == {} and tuned.skipped == {}
        np.testing.assert_allclose(np.asarray(tuned.compiled(*operands)), expected, rtol=1e-5, atol=1e-5)


def test_an_unknown_option_is_skipped_by_name(operands):
    lowered = jax.jit(_matmul_gelu).lower(*operands)
    tuned = compile_fastest(lowered, *operands, options={"plain": {}, "bogus": {"xla_no_such_option": 1}})
    assert tuned.name == "plain" and set(tuned.skipped) == {"bogus"}
    assert "xla_no_such_option" in tuned.skipped["bogus"]
    with pytest.raises(ValueError, match="no candidate compiled: bogus"):
        compile_fastest(lowered, *operands, options={"bogus": {"xla_no_such_option": 1}})


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
def test_bad_arguments_are_refused(operands):
    donating = jax.jit(_matmul_gelu, donate_argnums=1).lower(*operands)
    with pytest.raises(ValueError, match=r"donates argument leaves \[1\]"):
        compile_fastest(donating, *operands)
    with pytest.raises(ValueError, match="rounds must be at least 1, got 0"):
        compile_fastest(jax.jit(_matmul_gelu).lower(*operands), *operands, rounds=0)


def test_select_names_the_choices():
    from jaxaudio.autotune import select
    assert select("auto", "cpu") == candidates("cpu")
    assert select("eigen", "cpu") == {"eigen": candidates("cpu")["eigen"]}
    assert select("default", "gpu") == {"default": {}}
    with pytest.raises(ValueError, match="expected auto or one of ynnpack, eigen on cpu, got 'fastest'"):
        select("fastest", "cpu")
