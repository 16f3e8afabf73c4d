"""Learning-rate schedules (`train.optim.make_schedule`) against direct transcriptions of their rules."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import salmonn_13b, salmonn_tiny
from jaxaudio.train.optim import make_schedule, resolve_total_steps


def lavis_lr(step: int, lr: float, min_lr: float, start: float, warmup: int, total: int) -> float:
    """LAVIS' LinearWarmupCosineLRScheduler as SALMONN runs it, per optimizer step."""
    if step < warmup:
        return min(lr, start + (lr - start) * step / warmup)
    return (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / total)) + min_lr


def warmup_cosine_lr(step: int, lr: float, min_lr: float, start: float, warmup: int, total: int) -> float:
    """Linear warmup from `start`, then a half cosine over the steps after the warmup, flat at the end."""
    if step < warmup:
        return start + (lr - start) * step / warmup
    progress = min(step - warmup, total - warmup) / (total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _optim(**kw) -> ConfigDict:
    return ConfigDict(dict(dict(lr=3e-4, min_lr=1e-5, warmup_start_lr=2e-6, warmup_steps=10, total_steps=100), **kw))


def _check(schedule, reference, steps):
    got = np.asarray([float(schedule(s)) for s in steps])
    jitted = jax.jit(schedule)
    got_jit = np.asarray([float(jitted(jnp.int32(s))) for s in steps])  # optax passes a traced count
    want = np.asarray([reference(s) for s in steps])
    # float32: optax's warmup computes `(start - peak) * (1 - frac) + peak`, exact to float32
    # rounding of the peak (~1e-7 of it), not of the (much smaller) start value.
    atol = 2e-7 * float(np.max(want))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=atol, err_msg=f"steps {steps}")
    np.testing.assert_allclose(got_jit, want, rtol=2e-6, atol=atol, err_msg=f"jitted, steps {steps}")


STEPS = (0, 1, 5, 9, 10, 11, 37, 50, 99, 100)


def test_default_warms_up_from_start_lr_then_cosine_to_min_lr():
    cfg = _optim()
    _check(make_schedule(cfg), lambda s: warmup_cosine_lr(s, 3e-4, 1e-5, 2e-6, 10, 100), STEPS + (130,))
    schedule = make_schedule(cfg)
    assert float(schedule(0)) == pytest.approx(2e-6, abs=1e-10) and float(schedule(10)) == pytest.approx(3e-4)
    assert float(schedule(100)) == pytest.approx(1e-5) and float(schedule(1000)) == pytest.approx(1e-5)
    # Without warmup_start_lr the warmup starts at 0.
    del cfg["warmup_start_lr"]
    _check(make_schedule(cfg), lambda s: warmup_cosine_lr(s, 3e-4, 1e-5, 0.0, 10, 100), STEPS)


def test_lavis_matches_the_original_rule():
    _check(make_schedule(_optim(schedule="lavis")), lambda s: lavis_lr(s, 3e-4, 1e-5, 2e-6, 10, 100), STEPS)
    # The cosine counts from step 0, so right after the warmup the lr is already below the peak,
    # unlike the default schedule.
    lavis, default = make_schedule(_optim(schedule="lavis")), make_schedule(_optim())
    assert float(default(10)) == pytest.approx(3e-4) and float(lavis(10)) < 3e-4
    # No warmup: the cosine from the first step.
    _check(make_schedule(_optim(schedule="lavis", warmup_steps=0)),
           lambda s: lavis_lr(s, 3e-4, 1e-5, 2e-6, 0, 100), (0, 1, 50, 100))


@pytest.mark.parametrize("config", [salmonn_13b.get_config("1"), salmonn_tiny.get_config("2")], ids=["13b", "tiny"])
def test_salmonn_configs_use_lavis(config):
    assert config.optim.total_steps == 0  # the schedule follows train.steps, read when the run starts
    resolve_total_steps(config)
    o = config.optim
    assert o.schedule == "lavis" and o.total_steps == config.train.steps
    w, t = o.warmup_steps, o.total_steps

    def rule(step):
        return lavis_lr(step, o.lr, o.min_lr, o.warmup_start_lr, w, t)
    _check(make_schedule(o), rule, (0, 1, w // 2, w - 1, w, w + 1, t // 3, t // 2, t - 1, t))
    if config.model.llm.hidden_size == 5120:  # SALMONN's numbers: 1e-6 -> 3e-5 over 3000 steps, 1e-5 at the end
        s = make_schedule(o)
        assert (o.warmup_start_lr, o.lr, o.min_lr, w, t) == (1e-6, 3e-5, 1e-5, 3000, 90_000)
        assert float(s(0)) == pytest.approx(1e-6) and float(s(t)) == pytest.approx(1e-5)


def test_bad_schedule_name():
    with pytest.raises(ValueError, match=r"config.optim.schedule='cosine': choose 'warmup_cosine' or 'lavis'"):
        make_schedule(_optim(schedule="cosine"))
