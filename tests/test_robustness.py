"""Robustness metrics on tiny known cases, the corruptions against the libraries the published generator used,
and the K-model evaluation on trained models."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from conftest import F32, binomial_margin, real_subset
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from PIL import Image

from jaxcifar import configs
from jaxcifar.data import Split
from jaxcifar.data import corruptions as C
from jaxcifar.data.sources import load_tfds_corrupted
from jaxcifar.data.synthetic import synthetic_cifar
from jaxcifar.errors import ConfigError, DataError
from jaxcifar.metrics import calibration, disagreement_matrix, per_class_accuracy, seed_metrics
from jaxcifar.robustness import evaluate_robustness, seed_predictor
from jaxcifar.train import fit

KEY = jax.random.PRNGKey(0)


def _images(n: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images[0, :4, :4] = 128  # grey pixels (no hue)
    images[0, 4:8, :4] = 0  # black ones
    return images


def _toy_probs(confidence: float, num_classes: int = 10) -> np.ndarray:
    """One probability row: ``confidence`` on class 0, the rest spread evenly."""
    row = np.full(num_classes, (1 - confidence) / (num_classes - 1))
    row[0] = confidence
    return row


# ------------------------------------------------------------------------------------------------- metrics


def test_ensemble_of_identical_models_equals_each_model():
    rng = np.random.default_rng(0)
    one = jax.nn.softmax(jnp.asarray(rng.normal(size=(200, 10)) * 3))
    labels = jnp.asarray(rng.integers(0, 10, 200))
    m = seed_metrics(jnp.stack([one] * 4), labels)
    chex.assert_trees_all_close(m["ensemble"]["accuracy"], m["accuracy"][0])
    # The mean of 4 identical float32 softmaxes is the softmax up to two roundings (1.2e-7 relative) before the
    # metrics' sums over 200 images: rtol 1e-6 (random-rounding estimate sqrt(200) x 6e-8 ~ 8.5e-7).
    for key in ("ece", "nll", "brier", "bin_count"):
        chex.assert_trees_all_close(m["ensemble"][key], m[key][0], rtol=2e-6)
    np.testing.assert_array_equal(m["disagreement"], np.zeros((4, 4)))


def test_ece_is_zero_when_calibrated_and_measures_overconfidence():
    # In each of several confidence levels, exactly that fraction of the images is right: perfectly calibrated.
    rows, labels = [], []
    for confidence in (0.3, 0.5, 0.7, 0.9):
        right = int(round(confidence * 100))
        rows += [_toy_probs(confidence)] * 100
        labels += [0] * right + [1] * (100 - right)
    calibrated = calibration(jnp.asarray(np.array(rows)), jnp.asarray(labels))
    assert float(calibrated["ece"]) < 1e-6  # |confidence - accuracy| of float32 sums over 100 images: ~1e-7
    counts = np.asarray(calibrated["bin_count"])
    assert counts.sum() == 400 and (counts > 0).sum() == 4
    # Always 90 % sure but right half the time: ECE 0.4; NLL and Brier by hand.
    probs = jnp.asarray(np.array([_toy_probs(0.9)] * 10))
    over = calibration(probs, jnp.asarray([0] * 5 + [1] * 5))
    # Float32 means of 10 equal values: a few roundings (< 1e-6 of 0.4); NLL adds float32 logs (rel 1e-7).
    assert float(over["ece"]) == pytest.approx(0.4, abs=1e-6)
    assert float(over["nll"]) == pytest.approx(-(np.log(0.9) + np.log(0.1 / 9)) / 2, rel=1e-5)
    brier_right = 0.1**2 + 9 * (0.1 / 9) ** 2
    brier_wrong = 0.9**2 + (1 - 0.1 / 9) ** 2 + 8 * (0.1 / 9) ** 2
    assert float(over["brier"]) == pytest.approx((brier_right + brier_wrong) / 2, rel=1e-5)


def test_disagreement_and_per_class_accuracy_on_a_known_case():
    predictions = jnp.asarray([[0, 1, 2, 3], [0, 1, 2, 0], [1, 1, 0, 0]])
    np.testing.assert_allclose(disagreement_matrix(predictions),
                               [[0, 0.25, 0.75], [0.25, 0, 0.5], [0.75, 0.5, 0]])
    labels = jnp.asarray([0, 1, 2, 3])
    per_class = np.asarray(per_class_accuracy(predictions, labels, 5))
    np.testing.assert_allclose(per_class[:, :4], [[1, 1, 1, 1], [1, 1, 1, 0], [0, 1, 0, 0]])
    assert np.isnan(per_class[:, 4]).all()  # class 4 has no image


# ---------------------------------------------------------------------------------------------- corruptions


@pytest.mark.parametrize("name", C.corruption_names())
def test_corruption_keeps_shape_and_dtype_and_is_deterministic(name):
    images = _images()
    unchanged = C.corrupt(images, name, 0, KEY)
    np.testing.assert_array_equal(unchanged, images)
    first = C.corrupt(images, name, 1, KEY)
    assert first.shape == images.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(C.corrupt(images, name, 1, KEY), first)  # same key, same images
    assert not np.array_equal(first, images)
    if C.CORRUPTIONS[name].random:
        assert not np.array_equal(C.corrupt(images, name, 1, jax.random.PRNGKey(1)), first)


def test_colour_corruptions_match_a_hsv_round_trip():
    x = _images().astype(np.float32) / 255
    for shift in C.CORRUPTIONS["brightness"].params:
        hsv = rgb_to_hsv(x)
        hsv[..., 2] = np.clip(hsv[..., 2] + shift, 0, 1)
        # HSV round trips in float32 (ours) vs float64 (scikit-image-style reference) on values in [0, 1]:
        # a handful of roundings of numbers <= 1 (~4 x 6e-8 each): 1e-6, far below one grey level (0.004).
        np.testing.assert_allclose(C.brightness(KEY, jnp.asarray(x), shift), hsv_to_rgb(hsv), atol=1e-6)
    for a, b in C.CORRUPTIONS["saturate"].params:
        hsv = rgb_to_hsv(x)
        hsv[..., 1] = np.clip(hsv[..., 1] * a + b, 0, 1)
        np.testing.assert_allclose(C.saturate(KEY, jnp.asarray(x), (a, b)), hsv_to_rgb(hsv), atol=1e-6)


def test_blurs_match_scipy_filters():
    x = _images(3).astype(np.float32) / 255
    for sigma in C.CORRUPTIONS["gaussian_blur"].params:  # scikit-image's gaussian: truncate 4, nearest edges
        expected = ndi.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="nearest", truncate=4.0)
        # Float32 weighted sums of up to 2 x 25 values in [0, 1] with weights summing to 1 (SciPy: float32
        # too): worst case 50 eps ~ 6e-6, random-rounding estimate sqrt(50) u ~ 4e-7.
        np.testing.assert_allclose(C.gaussian_blur(KEY, jnp.asarray(x), sigma), expected, atol=6e-6)
    for params in C.CORRUPTIONS["defocus_blur"].params:  # OpenCV's filter2D: mirrored edges
        kernel = C.disk_kernel(*params)
        assert kernel.sum() == pytest.approx(1.0)
        expected = np.stack([ndi.correlate(x[0, :, :, c], kernel, mode="mirror") for c in range(3)], -1)
        # One float32 sum of up to 11 x 11 weighted values in [0, 1]: worst case 121 eps ~ 1.5e-5.
        np.testing.assert_allclose(C.defocus_blur(KEY, jnp.asarray(x[:1]), params)[0], np.clip(expected, 0, 1),
                                   atol=121 * F32)


def test_pixelate_matches_pil_box_resampling_within_its_rounding():
    images = _images()
    for severity, factor in enumerate(C.CORRUPTIONS["pixelate"].params, start=1):
        size = int(32 * factor)
        expected = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BOX)
                                        .resize((32, 32), Image.BOX)) for im in images])
        diff = np.abs(C.corrupt(images, "pixelate", severity, KEY).astype(int) - expected)
        assert diff.max() <= 1  # PIL rounds to uint8 between its passes


def test_bad_corruption_requests_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown corruption 'fog'"):
        C.corrupt(_images(), "fog", 1, KEY)
    with pytest.raises(ConfigError, match="severity 6"):
        C.corrupt(_images(), "contrast", 6, KEY)
    with pytest.raises(ConfigError, match="uint8"):
        C.corrupt(_images().astype(np.float32), "contrast", 1, KEY)


@pytest.mark.tfds
def test_tfds_corruptions_offline_fail_fast_with_the_fix(tmp_path, monkeypatch):
    import socket

    def unreachable(*args, **kwargs):
        raise OSError("no route")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(DataError, match="cannot reach.*evaluate_robustness without corrupted=") as e:
        load_tfds_corrupted("gaussian_noise", 1, data_dir=str(tmp_path))
    assert "--corruptions all" in e.value.cli


# ------------------------------------------------------------------------------------ trained models, together


@pytest.fixture(scope="module")
def trained():
    data = synthetic_cifar(512, 200)
    config = configs.baseline(epochs=2, val_size=100, eval_batch_size=100, log_every=50)
    return data, fit(config, data, runs=[{"seed": s} for s in range(3)], progress=False)


def test_evaluation_agrees_with_fit_and_vmap_equals_loop(trained):
    data, result = trained
    figures = evaluate_robustness(result, data.test, corruptions=["contrast"], severities=[1], progress=False)
    clean = figures["clean"]
    # The same weights in another program: the same predictions unless a logit margin is below rounding (none
    # in 200 images here), and a float32 mean of 200 zeros and ones is exact to one rounding (6e-8).
    np.testing.assert_allclose(clean["accuracy"], [s["test_accuracy"] for s in result.summaries], atol=1e-6)
    assert clean["summary"]["ensemble_gain"] == pytest.approx(
        clean["ensemble"]["accuracy"] - np.mean(clean["accuracy"]))
    assert len(clean["disagreement"]) == 3 and len(clean["per_class_accuracy"][0]) == 10
    # The K models batched (the GPU default) and one after another (the CPU default) predict the same.
    variables = result.state.weights("best")
    batched = seed_predictor(result.fns, variables, vmap_runs=True, batch_size=64)(data.test.images)
    looped = seed_predictor(result.fns, variables, vmap_runs=False, batch_size=64)(data.test.images)
    assert batched.shape == (3, 200, 10)
    # vmapped (grouped convolutions) vs looped: another summation order in each of the ConvNet's sums of up to
    # 576 products; random-rounding estimate 4 layers x sqrt(576) u ~ 6e-6 of the logits (~1), and a softmax
    # does not enlarge absolute errors: 1e-5 probabilities.
    np.testing.assert_allclose(batched, looped, atol=1e-5)


@pytest.mark.realdata
def test_corruptions_degrade_a_model_trained_on_real_cifar10(real_cifar10):
    """A model trained on real images (generated data would not do: a blur or JPEG denoises its noisy stripes)
    loses accuracy to contrast loss, and no corruption makes it better beyond sampling noise as severity grows.
    Fails loudly when the shared copy is missing.

    What 1000 test images can show, and no more: this 2-epoch model (0.40 clean) loses 0.21 to contrast at
    severity 5 (13 standard errors), but under most corruptions it changes by less than one standard error
    (pixelate and JPEG at severity 5: +0.005; a weak model relies on coarse features), so a per-corruption
    "every severity costs accuracy" check would test the sampling noise, not the corruptions."""
    data = real_subset(real_cifar10, train=5000, test=1000)
    config = configs.baseline(epochs=2, batch_size=64, learning_rate=0.01, val_size=0, log_every=50)
    result = fit(config, data, runs=[{"seed": 0}], progress=False)
    names = [n for n in C.corruption_names() if n != "saturate"]  # saturate desaturates at 1-2, saturates at 3-5
    figures = evaluate_robustness(result, data.test, corruptions=names, severities=[1, 3, 5], progress=False)
    clean, n = figures["clean"]["accuracy"][0], len(data.test)
    assert clean > 0.1 + binomial_margin(0.1, n)  # far above chance: the model learned
    cells = figures["corruptions"]["cells"]
    curves = {name: [clean] + [cells[name][s]["accuracy"][0] for s in ("1", "3", "5")] for name in names}
    for name, curve in curves.items():
        # Two accuracies on n images each differ by sampling noise of standard error at most
        # sqrt((p1 (1 - p1) + p2 (1 - p2)) / n) (independent samples; the same images under two severities are
        # positively correlated, which only narrows it): a rise beyond 3 of those is a real inversion.
        for a, b in zip(curve, curve[1:], strict=False):
            assert b <= a + 3 * np.sqrt((a * (1 - a) + b * (1 - b)) / n), (name, curve)
    contrast = curves["contrast"][-1]
    assert contrast < clean - 3 * np.sqrt((clean * (1 - clean) + contrast * (1 - contrast)) / n), curves


def test_evaluate_robustness_refuses_unknown_requests(trained):
    data, result = trained
    with pytest.raises(ConfigError, match="unknown corruption"):
        evaluate_robustness(result, data.test, corruptions=["snow"], progress=False)
    with pytest.raises(ConfigError, match="severities"):
        evaluate_robustness(result, data.test, severities=[0, 7], progress=False)


def test_corruptions_on_a_random_subset_of_the_test_images(trained):
    data, result = trained
    figures = evaluate_robustness(result, data.test, corruptions=["brightness"], severities=[2],
                                  corruption_images=50, progress=False)
    assert figures["corruptions"]["images"] == 50
    correct = np.asarray(figures["corruptions"]["cells"]["brightness"]["2"]["accuracy"]) * 50
    np.testing.assert_allclose(correct, np.round(correct), atol=1e-4)  # counts out of 50 (float32 mean x 50)
    assert len(figures["clean"]["per_class_accuracy"][0]) == 10  # the clean figures use the whole test set
    with pytest.raises(ConfigError, match="corruption_images 0"):
        evaluate_robustness(result, data.test, corruption_images=0, progress=False)


def test_generated_corruption_sets_are_splits_with_the_test_labels(trained):
    from jaxcifar.robustness import generated_corruptions

    data, _ = trained
    cell = generated_corruptions(data.test, KEY)("gaussian_noise", 2)
    assert isinstance(cell, Split) and np.array_equal(cell.labels, data.test.labels)
