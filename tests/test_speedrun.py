"""The speedrun recipe's pieces: patch whitening, partial-identity init, per-parameter rules, lookahead, the
triangular schedule, test-time augmentation, the program cache, and the recipe itself on real data."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import real_subset

from jaxcifar import configs
from jaxcifar.errors import ConfigError
from jaxcifar.models import SpeedrunNet, partial_identity, patch_whitening_kernel
from jaxcifar.train import TrainConfig, build, fit, init_state, make_optimizer, prepare_data, unit_schedule
from jaxcifar.train import loop as train_loop
from jaxcifar.train.program import PROGRAMS


def conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_whitening_kernel_whitens_patches():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(3, 3))
    images = jnp.asarray(rng.normal(size=(64, 8, 8, 3)) @ mix, jnp.float32)  # correlated channels
    kernel = patch_whitening_kernel(images, size=2, eps=1e-6)
    assert kernel.shape == (2, 2, 3, 24)
    flat = np.asarray(conv(images, kernel), np.float64).reshape(-1, 24)
    second_moment = flat[:, :12].T @ flat[:, :12] / len(flat)
    # Float32 error analysis: eigh of the 12 x 12 patch covariance has backward error ~ n * eps * ||C||, which
    # moves the whitened moment from I by ~ n * eps * cond(C); the regularization eps=1e-6 adds eps / lambda_min.
    # cond(C) is computed here (not assumed), with a constant of 10 for the covariance sum and the conv.
    eigenvalues = np.linalg.eigvalsh(_patch_covariance(images))
    f32 = np.finfo(np.float32).eps
    bound = 10 * 12 * f32 * eigenvalues[-1] / eigenvalues[0] + 1e-6 / eigenvalues[0]
    np.testing.assert_allclose(second_moment, np.eye(12), atol=bound)
    # The second half of the kernel is the first negated: each output is a sum of 12 products, computed in
    # float32 in an order XLA may choose per output channel, so each side is within 12 * eps * sum|w x| of the
    # exact value (sum|w x| is the conv of |images| with |kernel|); the two sides within twice that.
    magnitude = np.asarray(conv(jnp.abs(images), jnp.abs(kernel)), np.float64).reshape(-1, 24)[:, :12]
    assert np.all(np.abs(flat[:, 12:] + flat[:, :12]) <= 2 * 12 * f32 * magnitude)


def _patch_covariance(images) -> np.ndarray:
    """The uncentred covariance of the 2x2 patches of ``images``, in float64."""
    x = np.asarray(images, np.float64)
    patches = np.concatenate([x[:, i:7 + i, j:7 + j] for i in range(2) for j in range(2)], axis=-1)
    flat = patches.reshape(-1, 12)
    return flat.T @ flat / len(flat)


def test_partial_identity_passes_input_channels_through():
    kernel = partial_identity(jax.random.PRNGKey(0), (3, 3, 4, 6))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 5, 4))
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(y[..., :4], x, atol=1e-6)
    assert float(jnp.abs(y[..., 4:]).mean()) > 0.01  # the extra outputs keep their random init


@pytest.mark.parametrize("num_classes", [10, 100])
def test_speedrun_net_shapes_and_data_init(num_classes):
    model = SpeedrunNet(num_classes=num_classes)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)  # jitted: op by op, every op would compile
    assert jax.jit(model.apply)(variables, x).shape == (4, num_classes)
    assert "scale" not in variables["params"]["block0_bn0"]  # batch norm without a trainable scale
    params = model.init_from_data(variables["params"], x)
    np.testing.assert_allclose(params["whiten"]["kernel"], patch_whitening_kernel(x, 2))
    assert params["head"] is variables["params"]["head"]


def _toy_params():
    return {"whiten": {"kernel": jnp.ones((2,)), "bias": jnp.ones((2,))}, "block0_bn0": {"bias": jnp.ones((2,))},
            "head": {"kernel": jnp.ones((2,))}}


def test_param_rules_freeze_and_scale():
    rules = ((r"whiten/kernel", {"train_epochs": 0}), (r"whiten/bias", {"train_epochs": 1}),
             (r".*_bn\d/bias", {"lr_scale": 64.0}))
    c = TrainConfig(learning_rate=0.01, momentum=0.0, param_rules=rules, epochs=3)
    tx = make_optimizer(c, steps_per_epoch=2)
    params = _toy_params()
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    history = [params]
    for _ in range(6):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    np.testing.assert_array_equal(params["whiten"]["kernel"], 1.0)  # never trained
    bias = [float(h["whiten"]["bias"][0]) for h in history]
    assert bias[0] > bias[1] > bias[2] and bias[2] == bias[3] == bias[6]  # trained for 1 epoch = 2 steps
    step_bn = 1.0 - float(history[1]["block0_bn0"]["bias"][0])
    step_head = 1.0 - float(history[1]["head"]["kernel"][0])
    # Two float32 updates of size lr (x64): each 1 - p has a rounding of 1 relative to a step of ~0.1-6.4, so
    # the ratio carries ~2 x 6e-8 / 0.1 ~ 1.2e-6 relative error: 1e-5.
    np.testing.assert_allclose(step_bn / step_head, 64.0, rtol=1e-5)


def test_param_rule_errors_are_clear():
    c = TrainConfig(param_rules=((r"nothing/here", {"lr_scale": 2.0}),))
    with pytest.raises(ConfigError, match="matches no parameter"):
        make_optimizer(c, 10).init(_toy_params())
    with pytest.raises(ConfigError, match="not a regular expression"):
        train_loop.validate_config(TrainConfig(param_rules=(("(", {}),)))
    with pytest.raises(ConfigError, match="unknown keys"):
        train_loop.validate_config(TrainConfig(param_rules=(("head/.*", {"lr": 2}),)))
    with pytest.raises(ConfigError, match="plateau_patience and lookahead_every cannot be combined"):
        train_loop.validate_config(TrainConfig(plateau_patience=2, lookahead_every=5))


def test_lookahead_pulls_weights_to_the_slow_average():
    c = TrainConfig(learning_rate=0.1, momentum=0.0, lookahead_every=2, lookahead_decay=0.5, epochs=1)
    total = 4
    tx = make_optimizer(c, steps_per_epoch=total)
    p0 = {"w": jnp.asarray([1.0])}
    state = tx.init(p0)
    g = {"w": jnp.asarray([1.0])}
    u, state = tx.update(g, state, p0)
    p1 = optax.apply_updates(p0, u)
    np.testing.assert_allclose(p1["w"], 0.9)  # step 1: a plain SGD step
    u, state = tx.update(g, state, p1)
    p2 = optax.apply_updates(p1, u)
    decay = 0.5 * (2 / total) ** 3
    np.testing.assert_allclose(p2["w"], decay * 1.0 + (1 - decay) * 0.8, rtol=1e-6)  # synced to the slow weights


def test_lookahead_averages_batch_norm_statistics_too(tiny):
    """On a sync step the batch-norm statistics move to their slow average, like the weights, so the final
    weights and statistics belong together; between syncs they are the fast ones."""
    from jaxcifar.data.stats import normalize
    from jaxcifar.train.optim import LookaheadState

    config = configs.speedrun(epochs=1, batch_size=64, augment=(), lookahead_every=2, lookahead_decay=0.5,
                              model_kwargs={"widths": (8, 8, 8)})
    data = prepare_data(tiny, config)
    fns = build(config, data)
    s0 = init_state(config, fns, None, data.train[0])
    step = jax.jit(fns.train_step)
    images, labels = data.train
    batches = [(images[i * 64:(i + 1) * 64], labels[i * 64:(i + 1) * 64]) for i in range(2)]
    s1, _ = step(s0, batches[0], jax.random.key(0))

    def lookahead_state(s):
        return [x for x in jax.tree.leaves(s.opt_state, is_leaf=lambda x: isinstance(x, LookaheadState))
                if isinstance(x, LookaheadState)][0]

    chex.assert_trees_all_close(lookahead_state(s1).slow_stats, s0.batch_stats)  # no sync yet
    assert not np.allclose(s1.batch_stats["block0_bn0"]["mean"], s0.batch_stats["block0_bn0"]["mean"])
    # The fast statistics step 2 produces, then their average with the slow ones (decay ramps up cubically).
    x = normalize(batches[1][0], fns.mean, fns.std)
    _, fast = fns.model.apply(s1.variables, x, train=True, mutable=["batch_stats"])
    decay = 0.5 * (2 / (len(images) // 64)) ** 3
    s2, _ = step(s1, batches[1], jax.random.key(1))
    expected = jax.tree.map(lambda a, b: decay * a + (1 - decay) * b, s0.batch_stats, fast["batch_stats"])
    # The same statistics from another program (the step vs apply here): batch means over 64 x 31 x 31 values,
    # whose float32 random-rounding estimate sqrt(61504) u ~ 1.5e-5 is relative to the activations' scale
    # (~1): 1e-4 relative with 1e-5 absolute for near-zero entries is 6 times that.
    chex.assert_trees_all_close(s2.batch_stats, expected, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(lookahead_state(s2).slow_stats, s2.batch_stats)


def test_triangular_schedule_shape():
    c = TrainConfig(schedule="triangular", epochs=10, warmup_epochs=2.3, lr_start_factor=0.2, lr_end_factor=0.07)
    s = unit_schedule(c, steps_per_epoch=10)
    # Piecewise-linear values in float32, a few roundings each (< 3 x 6e-8 relative).
    np.testing.assert_allclose([s(0), s(23), s(100)], [0.2, 1.0, 0.07], rtol=1e-6)
    assert s(10) < s(20) and s(50) > s(80)


def test_mirror_tta_is_flip_invariant(tiny):
    data = prepare_data(tiny, TrainConfig(val_size=0))
    images = data.test[0][:8]
    for tta, invariant in ((0, False), (1, True)):
        config = configs.speedrun(tta=tta, batch_size=64)
        fns = build(config, data)
        variables = init_state(config, fns, None, data.train[0]).variables
        a, b = fns.logits(variables, images), fns.logits(variables, images[:, :, ::-1])
        # With TTA both orders average the same two views (exact up to the summation order of two terms: 1e-7 of
        # logits ~1); without it a flip changes logits by far more than 1e-5.
        assert np.allclose(a, b, atol=1e-5) == invariant


def test_second_fit_reuses_the_compiled_program(tiny):
    config = configs.speedrun(epochs=1, batch_size=64, val_size=0, unroll=2)
    config = config.replace(model_kwargs={**config.model_kwargs, "widths": (16, 32, 32)})  # narrow: fast on CPU
    first = fit(config, tiny, progress=False)
    programs = len(PROGRAMS)
    second = fit(config.replace(seed=1), tiny, progress=False)
    assert len(PROGRAMS) == programs  # same program: nothing traced or compiled again
    assert first.meta["compilations"] > 0 and second.meta["compilations"] == 0
    assert second.history["train_loss"] != first.history["train_loss"]  # but a different run
    # The frozen whitening kernel is still the data-derived one after training.
    fresh = init_state(config, second.fns, None, prepare_data(tiny, config).train[0])
    np.testing.assert_allclose(second.state.params["whiten"]["kernel"], fresh.params["whiten"]["kernel"])


@pytest.mark.realdata
@pytest.mark.parametrize("train, widths, floor", [
    # Narrow, 2500 images: over 5 seeds (subset and init; Zen 4) 0.354-0.385, mean 0.366, std 0.012 (the test
    # set's own binomial error is 0.011): the floor is the mean less 3 standard deviations.
    pytest.param(2500, (32, 64, 64), 0.33, id="narrow"),
    # The recipe's widths, 5000 images: 0.556 measured (seed 0), and 0.55 on another machine.
    pytest.param(5000, None, 0.45, id="full", marks=pytest.mark.slow)])
def test_speedrun_recipe_learns_real_cifar10_at_reduced_budget(real_cifar10, train, widths, floor):
    """The recipe at a CPU budget (2 epochs of batch 256) must reach far above chance (0.1) on 2000 real test
    images; fails loudly when the shared copy is missing."""
    data = real_subset(real_cifar10, train=train)
    config = configs.speedrun(epochs=2, batch_size=256)
    if widths:
        config = config.replace(model_kwargs={**config.model_kwargs, "widths": widths})
    result = fit(config, data, progress=False)
    assert result.history["train_loss"][1] < result.history["train_loss"][0]
    assert result.summary["final_test_accuracy"] > floor, result.summary
