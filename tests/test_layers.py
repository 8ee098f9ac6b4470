"""The CPU-fast layers agree with their flax.linen counterparts (values, gradients, variable names)."""

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxcifar.layers import BatchNorm, Conv, add_bias, channel_sum, max_pool_2x2


@pytest.mark.parametrize("shape", [(4, 6, 6, 5), (3, 5, 7, 8), (1, 1, 1, 3)])
def test_channel_sum_matches_sum(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    np.testing.assert_allclose(channel_sum(x), x.sum(axis=tuple(range(len(shape) - 1))), rtol=1e-5, atol=1e-5)


def test_add_bias_gradient_matches_autodiff():
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 5))
    b = jax.random.normal(jax.random.key(1), (5,))
    w = jax.random.normal(jax.random.key(2), x.shape)
    ours = jax.grad(lambda x, b: (add_bias(x, b) * w).sum(), argnums=(0, 1))(x, b)
    ref = jax.grad(lambda x, b: ((x + b) * w).sum(), argnums=(0, 1))(x, b)
    chex.assert_trees_all_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hw", [(8, 8), (7, 9)])
def test_max_pool_matches_reduce_window(hw):
    x = jax.random.normal(jax.random.key(0), (2, *hw, 3))
    ref = nn.max_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(max_pool_2x2(x), ref)
    g = jax.random.normal(jax.random.key(1), ref.shape)  # no ties in random data: identical gradients
    np.testing.assert_allclose(jax.grad(lambda x: (max_pool_2x2(x) * g).sum())(x),
                               jax.grad(lambda x: (nn.max_pool(x, (2, 2), strides=(2, 2)) * g).sum())(x))


@pytest.mark.parametrize("padding", ["VALID", "SAME", 1])
@pytest.mark.parametrize("strides", [1, 2])
def test_conv_matches_flax_conv(padding, strides):
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    ours, ref = Conv(4, (3, 3), strides, padding), nn.Conv(4, (3, 3), strides, padding=padding)
    params = ref.init(jax.random.key(1), x)
    chex.assert_trees_all_equal_shapes(ours.init(jax.random.key(1), x), params)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)


def test_batch_norm_matches_flax():
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (8, 5, 5, 4))
    ours, ref = BatchNorm(momentum=0.8), nn.BatchNorm(use_running_average=False, momentum=0.8)
    variables = ref.init(jax.random.key(1), x)
    chex.assert_trees_all_equal_shapes(ours.init(jax.random.key(1), x), variables)
    y1, s1 = ours.apply(variables, x, mutable=["batch_stats"])
    y2, s2 = ref.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_close(s1, s2, rtol=1e-5, atol=1e-5)
    evaluated = BatchNorm(use_running_average=True).apply({**variables, **s1}, x)
    expect = nn.BatchNorm(use_running_average=True).apply({**variables, **s1}, x)
    np.testing.assert_allclose(evaluated, expect, rtol=1e-5, atol=1e-5)
