"""Model output shapes, dropout behaviour, traced dropout rates."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcifar.errors import ConfigError
from jaxcifar.models import create_model

X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)


@pytest.mark.parametrize("name,kw", [("mlp", {"hidden": (64, 64)}), ("convnet", {}),
                                     ("convnet", {"batch_norm": True, "padding": "SAME", "activation": "gelu"}),
                                     ("resnet20", {}), ("resnet18", {})])
@pytest.mark.parametrize("classes", [10, 100])
def test_output_shapes(name, kw, classes):
    model = create_model(name, classes, **kw)
    # Shapes and dtypes only: traced, not compiled (op by op, eager init and apply compile every op)
    variables = jax.eval_shape(model.init, jax.random.key(0), X[:1])
    logits = jax.eval_shape(model.apply, variables, X)
    chex.assert_shape(logits, (4, classes))
    chex.assert_type(logits, jnp.float32)
    assert "head" in variables["params"]


def test_dropout_is_off_in_eval_and_on_in_train():
    model = create_model("convnet", 10, dropout_rate=0.5, dropout_at=("blocks", "head"))
    v = model.init(jax.random.key(0), X[:1])
    plain = create_model("convnet", 10)
    np.testing.assert_array_equal(model.apply(v, X), plain.apply(v, X))
    a = model.apply(v, X, train=True, rngs={"dropout": jax.random.key(1)})
    b = model.apply(v, X, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)


def test_dropout_rate_can_be_traced_and_vmapped():
    model = create_model("convnet", 10)
    v = model.init(jax.random.key(0), X[:1])

    def f(rate):
        return model.apply(v, X, train=True, dropout_rate=rate, rngs={"dropout": jax.random.key(1)})

    out = jax.jit(jax.vmap(f))(jnp.array([0.0, 0.5]))
    # rate 0 == eval, computed by another (vmapped, jitted) program that may sum each conv and dense layer in
    # another order: 4 layers of sums of up to 576 products, random-rounding estimate 4 sqrt(576) u ~ 6e-6 of
    # the activations' scale (logits ~1); 1e-4 is over 10 times that.
    np.testing.assert_allclose(out[0], model.apply(v, X), rtol=1e-4, atol=1e-4)
    assert not np.allclose(out[1], out[0])


def test_bfloat16_compute_keeps_float32_params():
    model = create_model("convnet", 10, dtype=jnp.bfloat16)
    v = model.init(jax.random.key(0), X[:1])
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v["params"]))
    chex.assert_type(model.apply(v, X), jnp.float32)


def test_unknown_model_and_activation():
    with pytest.raises(ConfigError, match="unknown model 'vgg'"):
        create_model("vgg", 10)
    with pytest.raises(ConfigError, match="unknown activation 'tanhh'"):
        create_model("convnet", 10, activation="tanhh")
