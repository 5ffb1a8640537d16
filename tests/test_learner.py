"""Learner: schedules against a numpy reference, clipping, the weight-decay mask by path, every optimizer."""

import functools
import math

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from axmini.config import config_for_function
from axmini.layers.embedding import Embedding
from axmini.layers.linear import Linear
from axmini.layers.norm import RMSNorm
from axmini.trainer.learner import Decay, Learner, adamw, warmup_decay_schedule


def reference_lr(step, peak, warmup, total, decay, final_ratio):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    if decay == "cosine":
        return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if decay == "linear":
        return peak * (1 - (1 - final_ratio) * progress)
    return peak


@pytest.mark.parametrize("decay", [Decay.COSINE, Decay.LINEAR, Decay.CONSTANT])
def test_schedule_matches_reference(decay):
    schedule = warmup_decay_schedule(peak_lr=1e-2, warmup_steps=10, total_steps=50, decay=decay, final_lr_ratio=0.1)
    steps = [0, 1, 5, 9, 10, 11, 25, 49, 50, 80]
    values = jax.jit(jax.vmap(schedule))(jnp.asarray(steps))
    for step, value in zip(steps, values):
        assert float(value) == pytest.approx(reference_lr(step, 1e-2, 10, 50, decay.value, 0.1), rel=1e-5, abs=1e-7), (
            step
        )


def test_schedule_total_steps_comes_from_max_step():
    cfg = Learner.default_config().set(max_step=40)
    cfg.learning_rate.set(peak_lr=1.0, warmup_steps=4)
    learner = cfg.instantiate()
    assert float(learner.learning_rate(jnp.int32(0))) == pytest.approx(0.25)
    assert float(learner.learning_rate(jnp.int32(4))) == pytest.approx(1.0)
    assert float(learner.learning_rate(jnp.int32(40))) == pytest.approx(0.1)  # Decayed to 10% at max_step.


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.embedding = Embedding.default_config().set(num_embeddings=8, dim=4).instantiate(rngs=rngs)
        self.dense = Linear.default_config().set(input_dim=4, output_dim=4, bias=True).instantiate(rngs=rngs)
        self.final_norm = RMSNorm.default_config().set(input_dim=4).instantiate(rngs=rngs)


@functools.cache
def _params():
    return jax.jit(lambda: nnx.state(Tiny(nnx.Rngs(0)), nnx.Param))()  # One compiled call, not many eager ops.


def params():
    return jax.tree.map(lambda x: x, _params())


def flat(tree):
    return {
        "/".join(str(k.key) for k in path[:-1]): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_default_mask_decays_only_matrices():
    abstract = nnx.state(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))), nnx.Param)
    mask = flat(Learner.default_config().set(max_step=1).instantiate().decay_mask(abstract))
    assert mask == {
        "dense/bias": False,
        "dense/weight": True,
        "embedding/weight": False,
        "final_norm/scale": False,
    }


def test_weight_decay_applies_by_path():
    """With zero gradients, AdamW moves only the decayed parameters: p <- p - lr * wd * p."""
    p = params()
    cfg = Learner.default_config().set(max_step=10, learning_rate=0.1, max_grad_norm=None)
    cfg.optimizer.weight_decay = 0.5
    cfg.no_decay_patterns = [r"(^|/)bias$", r"norm"]  # The embedding is decayed now.
    learner = cfg.instantiate()
    zeros = jax.tree.map(jnp.zeros_like, p)
    new = flat(jax.jit(learner.update)(zeros, learner.init(p), p, jnp.int32(0)).params)
    old = flat(p)
    for path in old:
        decayed = path in ("dense/weight", "embedding/weight")
        expected = old[path] * (1 - 0.1 * 0.5) if decayed else old[path]
        np.testing.assert_allclose(new[path], expected, rtol=1e-6, atol=1e-7, err_msg=path)


def test_clipping_bounds_the_global_norm():
    p = params()
    learner = (
        Learner.default_config()
        .set(max_step=10, learning_rate=1.0, max_grad_norm=2.0, optimizer=config_for_function(optax.sgd))
        .set(update_norm_summary=True)
        .instantiate()
    )
    grads = jax.tree.map(lambda x: jnp.full_like(x, 3.0), p)
    grad_norm = math.sqrt(sum(9.0 * x.size for x in jax.tree.leaves(p)))
    out = jax.jit(learner.update)(grads, learner.init(p), p, jnp.int32(0))
    for path, value in flat(out.params).items():  # SGD: p - lr * g * (2 / |g|).
        np.testing.assert_allclose(value, flat(p)[path] - 3.0 * 2.0 / grad_norm, rtol=1e-5, atol=1e-7)
    assert float(out.summaries["grad_norm"]) == pytest.approx(grad_norm, rel=1e-5, abs=1e-7)
    assert float(out.summaries["update_norm"]) == pytest.approx(2.0, rel=1e-5, abs=1e-7)
    assert float(out.summaries["learning_rate"]) == 1.0


def test_update_norm_is_summarized_only_when_asked():
    p = params()
    learner = Learner.default_config().set(max_step=10).instantiate()
    out = jax.jit(learner.update)(p, learner.init(p), p, jnp.int32(0))
    assert set(out.summaries) == {"learning_rate", "grad_norm"}


@pytest.mark.parametrize(
    "optimizer",
    [
        adamw(),
        config_for_function(optax.adafactor).set(weight_decay_rate=0.01, min_dim_size_to_factor=2),
        config_for_function(optax.lion).set(weight_decay=0.01),
        config_for_function(optax.sgd).set(momentum=0.9),
    ],
    ids=["adamw", "adafactor", "lion", "sgd"],
)
def test_each_optimizer_reduces_a_quadratic(optimizer):
    p = params()
    target = jax.tree.map(lambda x: jnp.ones_like(x) * 0.5, p)
    cfg = Learner.default_config().set(max_step=60, optimizer=optimizer)
    cfg.learning_rate.set(peak_lr=0.05, warmup_steps=5)
    learner = cfg.instantiate()

    def loss(p):
        return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target)))

    @jax.jit
    def step(p, opt_state, i):
        out = learner.update(jax.grad(loss)(p), opt_state, p, i)
        return out.params, out.opt_state

    opt_state = jax.jit(learner.init)(p)
    before = float(loss(p))
    for i in range(60):
        p, opt_state = step(p, opt_state, jnp.int32(i))
    assert float(loss(p)) < 0.5 * before


def test_bad_config_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"no_decay_patterns.*'\('"):
        Learner.default_config().set(max_step=1, no_decay_patterns=["("]).instantiate()
    with pytest.raises(ValueError, match="takes no learning_rate"):
        Learner.default_config().set(
            max_step=1, optimizer=config_for_function(optax.scale, step_size=1.0)
        ).instantiate()
