"""The CPU-fast layers agree with their flax.linen counterparts (values, gradients, variable names)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import F32, sum_bound

from jaxcifar.layers import BatchNorm, Conv, add_bias, channel_sum, max_pool_2x2


@pytest.mark.parametrize("shape", [(4, 6, 6, 5), (3, 5, 7, 8), (1, 1, 1, 3)])
def test_channel_sum_matches_sum(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    axes = tuple(range(len(shape) - 1))
    # Two summation orders of n = prod(shape[:-1]) terms: within sum_bound of each other.
    bound = sum_bound(int(np.prod(shape[:-1])), np.abs(np.asarray(x, np.float64)).sum(axes))
    assert np.all(np.abs(np.asarray(channel_sum(x)) - np.asarray(x.sum(axis=axes))) <= bound)


def test_add_bias_gradient_matches_autodiff():
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 5))
    b = jax.random.normal(jax.random.key(1), (5,))
    w = jax.random.normal(jax.random.key(2), x.shape)
    ours = jax.grad(lambda x, b: (add_bias(x, b) * w).sum(), argnums=(0, 1))(x, b)
    ref = jax.grad(lambda x, b: ((x + b) * w).sum(), argnums=(0, 1))(x, b)
    np.testing.assert_array_equal(ours[0], ref[0])  # d/dx is w itself: no arithmetic
    # d/db sums w over the 144 positions of each channel, in an order of each implementation's choosing.
    assert np.all(np.abs(np.asarray(ours[1]) - np.asarray(ref[1])) <= sum_bound(144, np.abs(w).sum((0, 1, 2))))


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
    # Each output sums 27 products (3x3 window, 3 channels) plus the bias: two orders stay within
    # sum_bound(28, sum |w x| + |b|), the conv of |x| with |w| (a product's own rounding is within that too).
    magnitude = ref.apply(jax.tree.map(jnp.abs, params), jnp.abs(x))
    assert np.all(np.abs(ours.apply(params, x) - ref.apply(params, x)) <= sum_bound(28, magnitude) + F32 * magnitude)


def test_batch_norm_matches_flax():
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (8, 5, 5, 4))
    ours, ref = BatchNorm(momentum=0.8), nn.BatchNorm(use_running_average=False, momentum=0.8)
    variables = ref.init(jax.random.key(1), x)
    chex.assert_trees_all_equal_shapes(ours.init(jax.random.key(1), x), variables)
    y1, s1 = ours.apply(variables, x, mutable=["batch_stats"])
    y2, s2 = ref.apply(variables, x, mutable=["batch_stats"])
    # Float32 analysis over the n = 200 values per channel (x ~ 3 + 2 N(0, 1)): the mean differs by at most
    # sum_bound(n, sum|x|) / n, E[x^2] by sum_bound(n, sum x^2) / n, so the variance (E[x^2] - mean^2 or the
    # centred form: either) by dv <= that + 2 |mean| dmean. y = (x - mean) / sqrt(v + eps) moves by
    # dmean / std + |y| dv / (2 v), plus a few roundings of y itself.
    xs = np.asarray(x, np.float64).reshape(-1, 4)
    dmean = sum_bound(200, np.abs(xs).sum(0)) / 200
    dvar = sum_bound(200, (xs * xs).sum(0)) / 200 + 2 * np.abs(xs.mean(0)) * dmean
    var = xs.var(0)
    bound = dmean / np.sqrt(var) + np.abs(np.asarray(y2)) * dvar / (2 * var) + 4 * F32 * np.abs(np.asarray(y2))
    assert np.all(np.abs(np.asarray(y1) - np.asarray(y2)) <= bound)
    # The running averages: 0.8 old + 0.2 batch statistic, each within the bounds above.
    np.testing.assert_array_less(np.abs(np.asarray(s1["batch_stats"]["mean"] - s2["batch_stats"]["mean"])),
                                 0.2 * dmean + 2 * F32 * np.abs(xs.mean(0)))
    np.testing.assert_array_less(np.abs(np.asarray(s1["batch_stats"]["var"] - s2["batch_stats"]["var"])),
                                 0.2 * dvar + 2 * F32 * var)
    evaluated = BatchNorm(use_running_average=True).apply({**variables, **s1}, x)
    expect = nn.BatchNorm(use_running_average=True).apply({**variables, **s1}, x)
    # From the same stored statistics only the elementwise arithmetic differs: a few roundings of terms as large
    # as |x| / std and |mean| / std (a folded x * mul + (bias - mean * mul) rounds those before they cancel).
    stats = s1["batch_stats"]
    mul = 1 / np.sqrt(np.asarray(stats["var"], np.float64) + 1e-5)
    bound = 8 * F32 * ((np.abs(np.asarray(x)) + np.abs(np.asarray(stats["mean"]))) * mul + np.abs(np.asarray(expect)))
    assert np.all(np.abs(np.asarray(evaluated) - np.asarray(expect)) <= bound)
