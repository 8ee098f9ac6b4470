"""Statistics, splits, augmentation and batching: pure functions under jit/vmap."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcifar.data import (
    AUGMENTATIONS,
    channel_stats,
    check_normalized,
    class_counts,
    epoch_batches,
    eval_batches,
    make_augment,
    normalize,
    random_crop,
    random_flip,
    split_indices,
    train_val_split,
)
from jaxcifar.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)


def test_channel_stats_and_normalization(images):
    mean, std = channel_stats(images, chunk=10)  # several chunks
    x = images.astype(np.float64) / 255
    # Float32 sums of 1024 values in [0, 1] per image, then over images: the random-rounding estimate
    # sqrt(n) u (n = 65536 values, u = 6e-8) is 1.5e-5 of the sum's scale for the mean and for E[x^2]; std =
    # sqrt(E[x^2] - mean^2) then moves by about that over 2 std (0.58). 1e-4 is over 5 times both.
    np.testing.assert_allclose(mean, x.mean((0, 1, 2)), atol=1e-4)
    np.testing.assert_allclose(std, x.std((0, 1, 2)), atol=1e-4)
    z = normalize(jnp.asarray(images), mean, std)
    chex.assert_shape(z, images.shape)
    chex.assert_type(z, jnp.float32)
    # z = (x - mean) / std elementwise (|z| <= 1.8 for uniform bytes), then float32 moments over 65536 values:
    # sqrt(n) u |z| ~ 3e-5, plus the statistics' own error (<= 1e-4 / 0.29 from above) -- within 5e-4.
    np.testing.assert_allclose(z.mean((0, 1, 2)), 0, atol=5e-4)
    np.testing.assert_allclose(z.std((0, 1, 2)), 1, atol=5e-4)
    assert check_normalized(images, mean, std)["ok"]
    assert not check_normalized(images, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))["ok"]


@pytest.mark.parametrize("val", [100, 0.2])
@pytest.mark.parametrize("stratified", [False, True])
def test_split_is_disjoint_covering_and_seeded(val, stratified):
    labels = np.repeat(np.arange(5), 100)
    tr, va = split_indices(jax.random.key(0), labels, val, stratified=stratified)
    assert len(va) == 100 and len(tr) == 400
    assert set(np.asarray(tr)).isdisjoint(set(np.asarray(va)))
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(500))
    if stratified:
        np.testing.assert_array_equal(class_counts(labels[np.asarray(va)], 5), [20] * 5)
    tr2, va2 = split_indices(jax.random.key(0), labels, val, stratified=stratified)
    np.testing.assert_array_equal(va, va2)
    _, va3 = split_indices(jax.random.key(1), labels, val, stratified=stratified)
    assert not np.array_equal(np.sort(va), np.sort(va3))


def test_split_vmaps_over_keys_and_rejects_bad_sizes(tiny):
    keys = jax.random.split(jax.random.key(0), 3)
    _, va = jax.vmap(lambda k: split_indices(k, tiny.train.labels, 50, stratified=True))(keys)
    chex.assert_shape(va, (3, 50))
    assert len({tuple(np.sort(v)) for v in np.asarray(va)}) == 3
    train, val = train_val_split(tiny.train, 0.25, seed=0)
    assert (len(train), len(val)) == (384, 128)
    with pytest.raises(ConfigError, match="validation size"):
        split_indices(jax.random.key(0), tiny.train.labels, 512)
    with pytest.raises(ConfigError, match="fraction"):
        split_indices(jax.random.key(0), tiny.train.labels, 1.5)


ALL_OPS = [("flip", {}), ("crop", {"padding": 4}), ("crop", {"padding": 4, "mode": "reflect"}),
           ("translate", {"max_shift": 2}), ("rotate", {"max_degrees": 20}), ("color", {}), ("cutout", {"size": 8})]


@pytest.mark.parametrize("op", ALL_OPS, ids=lambda o: f"{o[0]}{o[1]}")
@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.float32])
def test_augmentations_keep_shape_dtype_and_are_keyed(images, op, dtype):
    x = jnp.asarray(images) if dtype == jnp.uint8 else jnp.asarray(images, jnp.float32) / 255
    fn = jax.jit(make_augment([op]))
    a = fn(jax.random.key(1), x)
    chex.assert_shape(a, x.shape)
    chex.assert_type(a, dtype)
    np.testing.assert_array_equal(a, fn(jax.random.key(1), x))  # deterministic per key
    batched = jax.vmap(fn, in_axes=(0, None))(jax.random.split(jax.random.key(2), 2), x)
    assert not np.array_equal(batched[0], batched[1])  # different keys, different results
    assert not np.array_equal(a, x)


def test_flip_twice_is_identity_and_mirrors(images):
    x = jnp.asarray(images)
    always = random_flip(jax.random.key(0), x, p=1.0)
    np.testing.assert_array_equal(always, x[:, :, ::-1])
    np.testing.assert_array_equal(random_flip(jax.random.key(0), always, p=1.0), x)


def test_zero_padded_crop_moves_content():
    x = jnp.zeros((256, 32, 32, 1), jnp.uint8).at[:, 10, 20, 0].set(255)
    key = jax.random.key(3)
    y = random_crop(key, x, padding=4, mode="constant")
    offsets = jax.random.randint(key, (256, 2), 0, 9)  # the same draw random_crop makes
    for i in range(256):
        dy, dx = np.asarray(offsets[i]) - 4
        expected = np.zeros((32, 32), np.uint8)
        expected[10 - dy, 20 - dx] = 255
        np.testing.assert_array_equal(y[i, :, :, 0], expected)
    corner = jnp.full((1, 32, 32, 1), 9, jnp.uint8)
    shifted = random_crop(jax.random.key(5), jnp.repeat(corner, 64, 0), padding=4)
    assert (np.asarray(shifted) == 0).any()  # zero fill enters from the border


def test_pipeline_composes_every_op_and_rejects_unknown(images):
    fn = jax.jit(make_augment([name for name in AUGMENTATIONS]))
    chex.assert_shape(fn(jax.random.key(0), jnp.asarray(images)), images.shape)
    np.testing.assert_array_equal(make_augment([])(jax.random.key(0), images), images)
    with pytest.raises(ConfigError, match="unknown augmentation 'blur'"):
        make_augment(["blur"])


def test_epoch_batches_shuffle_and_drop_remainder():
    idx = jax.jit(epoch_batches, static_argnums=(1, 2))(jax.random.key(0), 100, 32)
    chex.assert_shape(idx, (3, 32))
    flat = np.asarray(idx).ravel()
    assert len(set(flat)) == 96 and flat.max() < 100
    other = epoch_batches(jax.random.key(1), 100, 32)
    assert not np.array_equal(idx, other)
    with pytest.raises(ConfigError, match="batch size 101"):
        epoch_batches(jax.random.key(0), 100, 101)


@pytest.mark.parametrize("n,b", [(10, 3), (10, 10), (10, 64), (1000, 128)])
def test_eval_batches_visit_each_example_once(n, b):
    idx, w = eval_batches(n, b)
    visited = idx[w > 0]
    np.testing.assert_array_equal(np.sort(visited), np.arange(n))
    assert w.sum() == n


def test_subset_is_seeded_stratified_and_shuffled(tiny):
    from jaxcifar.data import class_counts

    ordered = tiny.__class__(tiny.name, tiny.train.take(np.argsort(tiny.train.labels, kind="stable")), tiny.test,
                             tiny.class_names, source="class order")  # as a local copy loads
    sub = ordered.subset(100, 50, seed=3)
    assert (len(sub.train), len(sub.test)) == (100, 50) and "subset" in sub.source
    counts = class_counts(sub.train.labels, 10)
    expected = class_counts(ordered.train.labels, 10) * 100 / len(ordered.train)
    assert np.all(np.abs(counts - expected) < 1), counts  # every class keeps its share
    assert len(set(sub.train.labels[:20].tolist())) > 3  # shuffled, not a single-class prefix
    again = ordered.subset(100, 50, seed=3)
    np.testing.assert_array_equal(again.train.images, sub.train.images)
    assert not np.array_equal(ordered.subset(100, 50, seed=4).train.labels, sub.train.labels)
    assert len(ordered.subset(n_test=10).train) == len(ordered.train)
    with pytest.raises(DataError, match="subset of 1000 examples from a split of 512"):
        ordered.subset(1000)


def test_dataset_from_arrays_checks_and_trains():
    from jaxcifar.data import Dataset
    from jaxcifar.train import TrainConfig, fit

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (96, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 96)
    ds = Dataset.from_arrays(images, labels, images[:32] / 255.0, labels[:32], class_names=["a", "b", "c"])
    assert ds.num_classes == 3 and ds.test.images.dtype == np.uint8 and ds.train.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.test.images, images[:32])  # [0, 1] floats round back to the same uint8
    assert Dataset.from_arrays(images, labels, images, labels).class_names == ("0", "1", "2")
    for args, match in (((images.astype(np.float32), labels), "floats up to 255"),
                        ((images.transpose(0, 3, 1, 2), labels), "NCHW"),
                        ((images, labels + 5), r"labels range over \[5, 7\] but there are 3 classes"),
                        ((images, np.eye(3)[labels]), "one integer label per image")):
        with pytest.raises(DataError, match=match):
            Dataset.from_arrays(*args, images, labels, class_names=["a", "b", "c"])
    result = fit(TrainConfig(epochs=1, batch_size=32, val_size=32, log_every=1, eval_batch_size=32), ds,
                 progress=False)
    assert result.history["epoch"] == [1] and np.isfinite(result.history["train_loss"]).all()
