"""The reference reports' recipes (jaxcifar.configs.reference): layer shapes as the reports state them, PyTorch's
default init, exact GELU, Dropout2d, selective batch norm, coupled-L2 Adam, resize-and-crop."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import F32

from jaxcifar import configs
from jaxcifar.data.augment import random_rotation, resize_crop
from jaxcifar.errors import ConfigError
from jaxcifar.models import ACTIVATIONS, ConvNet, Dropout, create_model
from jaxcifar.train import make_optimizer, validate_config

KEYS = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}


def _params(config, num_classes: int = 10, shapes_only: bool = True):
    weight_init = {} if config.init == "flax" else {"weight_init": config.init}
    model = create_model(config.model, num_classes, **weight_init, **config.model_kwargs)
    init = lambda: model.init(KEYS, jnp.zeros((2, 32, 32, 3)), train=True)["params"]  # noqa: E731
    return jax.eval_shape(init) if shapes_only else init()


@pytest.mark.parametrize(("name", "layer", "shape"), [
    ("d_wide", "head", (1152, 10)),  # report D: 128 x 3 x 3 after two pools
    ("d_improved", "dense0", (1152, 512)),
    ("c_improved", "dense0", (1600, 512)),  # the given CNN: 64 x 5 x 5
    ("e_improved", "dense0", (3200, 1024)),  # report E's print: 128 x 5 x 5
    ("b1", "dense0", (3072, 4096)),
    ("b2", "dense0", (12 * 12 * 64, 4096)),
    ("b4b", "dense0", (12 * 12 * 256, 8192)),
])
def test_reference_layer_shapes(name, layer, shape):
    config = configs.reference(name)
    validate_config(config)
    assert _params(config, 100 if name.startswith("b") else 10)[layer]["kernel"].shape == shape


def test_report_d_convs_and_width_scaling():
    p = _params(configs.report_d_wide())
    assert [p[f"conv{b}_{c}"]["kernel"].shape for b, c in ((0, 0), (0, 1), (1, 0), (1, 1))] == [
        (3, 3, 3, 256), (3, 3, 256, 512), (5, 5, 512, 256), (5, 5, 256, 128)]
    small = _params(configs.report_d_wide(width=0.125))
    assert small["conv0_1"]["kernel"].shape == (3, 3, 32, 64) and small["head"]["kernel"].shape == (16 * 9, 10)


def test_selective_batch_norm_and_its_position():
    d2 = _params(configs.report_d_improved())
    assert sorted(k for k in d2 if k.startswith("bn")) == ["bn0_0", "bn1_1"]  # after conv1 and conv4
    assert "bias" not in d2["conv0_0"] and "bias" in d2["conv0_1"]  # a bias before batch norm is dropped
    b4a = _params(configs.report_b("b4a"), 100)
    assert len([k for k in b4a if k.startswith("bn")]) == 4 and "bias" in b4a["conv0_0"]  # BN after ReLU
    model = ConvNet(batch_norm=True, norm_after_activation=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 32, 32, 3))
    variables = model.init(KEYS, x, train=True)
    out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert out.shape == (8, 10)


def test_torch_init_bounds_kernels_and_biases_by_fan_in():
    config = configs.report_c_improved()
    params = _params(config, shapes_only=False)
    for layer, fan_in in (("conv0_0", 27), ("conv1_1", 9 * 64), ("dense0", 1600), ("head", 512)):
        bound = 1 / math.sqrt(fan_in)
        for kind in ("kernel", "bias"):
            value = np.asarray(params[layer][kind])
            assert np.abs(value).max() <= bound and np.abs(value).max() > 0.8 * bound, (layer, kind)
    flax_params = _params(configs.baseline(), shapes_only=False)
    assert not np.asarray(flax_params["dense0"]["bias"]).any()  # Flax: zero biases
    with pytest.raises(ConfigError, match="init 'torch' is available for the models"):
        validate_config(configs.baseline(model="resnet20", init="torch"))
    with pytest.raises(ConfigError, match="unknown init"):
        validate_config(configs.baseline(init="pytorch"))


def test_exact_gelu_and_channel_dropout():
    x = jnp.linspace(-4, 4, 101)
    exact = 0.5 * x * (1 + jax.scipy.special.erf(x / jnp.sqrt(2.0)))
    # The same float32 formula up to the order of two products: a few roundings of values up to 4 (~5e-7).
    np.testing.assert_allclose(ACTIVATIONS["gelu_exact"](x), exact, atol=4 * 4 * F32)
    assert float(jnp.abs(ACTIVATIONS["gelu"](x) - exact).max()) > 1e-4  # the tanh form differs
    ones = jnp.ones((4, 6, 6, 32))
    out = Dropout(broadcast_dims=(1, 2)).apply({}, ones, 0.5, True, rngs={"dropout": jax.random.PRNGKey(0)})
    per_channel = np.asarray(out).reshape(4, 36, 32)
    assert (per_channel == per_channel[:, :1]).all()  # a channel is dropped or kept whole
    assert set(np.unique(per_channel)) == {0.0, 2.0}


def test_report_d_improved_adam_decay_is_coupled_l2():
    config = configs.report_d_improved()
    tx = make_optimizer(config, steps_per_epoch=100)
    reference = optax.chain(optax.add_decayed_weights(1e-4), optax.adam(5e-4))  # PyTorch Adam(weight_decay)
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    grads = {"w": jnp.full((2, 3), 0.3)}
    ours, _ = tx.update(grads, tx.init(params), params)
    expected, _ = reference.update(grads, reference.init(params), params)
    # The same float32 arithmetic in the same order, up to a fused multiply-add: a few roundings (< 1e-6).
    np.testing.assert_allclose(ours["w"], expected["w"], rtol=8 * F32)
    assert config.plateau_patience == 5 and config.plateau_factor == 0.5


def test_resize_crop_and_nearest_rotation():
    images = jax.random.randint(jax.random.PRNGKey(0), (4, 32, 32, 3), 0, 256).astype(jnp.uint8)
    out = resize_crop(jax.random.PRNGKey(1), images, size=40)
    assert out.shape == images.shape and out.dtype == jnp.uint8
    np.testing.assert_array_equal(out, resize_crop(jax.random.PRNGKey(1), images, size=40))
    big = np.asarray(jax.image.resize(images.astype(jnp.float32) / 255, (4, 40, 40, 3), "linear"))
    windows = [np.round(big[0, y:y + 32, x:x + 32] * 255) for y in range(9) for x in range(9)]
    assert any(np.array_equal(w, np.asarray(out[0])) for w in windows)  # a 32x32 window of the resized image
    with pytest.raises(ConfigError, match="at least the image size"):
        resize_crop(jax.random.PRNGKey(1), images, size=30)
    rotated = np.asarray(random_rotation(jax.random.PRNGKey(2), images, 15.0, order=0))
    for original, turned in zip(np.asarray(images), rotated, strict=True):
        assert set(map(tuple, turned.reshape(-1, 3))) <= set(map(tuple, original.reshape(-1, 3))) | {(0, 0, 0)}


def test_reference_names_and_errors():
    names = configs.reference_names()
    assert {"d_wide", "d_improved", "c_improved", "e_improved", "b1", "b7"} <= set(names)
    for name in names:
        validate_config(configs.reference(name))
    b7 = configs.report_b("b7")
    assert (b7.dropout_rate, b7.learning_rate, b7.batch_size, b7.augment) == (0.8, 1e-3, 128, ("flip",))
    assert configs.reference("d_wide", epochs=1).epochs == 1
    with pytest.raises(ConfigError, match="unknown reference recipe 'z'"):
        configs.reference("z")
    with pytest.raises(ConfigError, match="kernel_size"):
        _params(configs.baseline(model_kwargs={"kernel_size": (3, 5, 7)}))
    with pytest.raises(ConfigError, match=r"outside 0\.\.3"):
        _params(configs.baseline(model_kwargs={"batch_norm": (0, 4)}))
