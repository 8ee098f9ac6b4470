"""The training core: learning, determinism, exact resume, checkpoints, plateau, errors, sweeps."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_matches_own_run_only, interrupt_after, steps_on_one_batch, strip_times

from jaxcifar.errors import CheckpointError, ConfigError, DataError, TrainingError
from jaxcifar.train import (
    TrainConfig,
    build,
    checkpoint_manager,
    fit,
    init_state,
    load_body,
    prepare_data,
    restore,
    unstack_state,
)
from jaxcifar.train.predict import load_trained

FAST = TrainConfig(epochs=2, batch_size=32, val_size=64, learning_rate=0.01, log_every=4, unroll=2,
                   eval_batch_size=64)


def test_loss_falls_within_a_few_steps(tiny):
    _, _, losses = steps_on_one_batch(FAST.replace(epochs=1), tiny)
    assert losses[-1] < 0.7 * losses[0], losses


def test_overfits_a_small_batch(tiny):
    small = tiny.__class__(tiny.name, tiny.train.take(np.arange(64)), tiny.test, tiny.class_names, source="small")
    cfg = FAST.replace(epochs=15, val_size=0, optimizer="adam", learning_rate=3e-3, batch_size=32)
    result = fit(cfg, small, progress=False)
    assert result.history["train_accuracy"][-1] >= 0.98, result.history["train_accuracy"]
    # no validation split: nothing is recorded as validation, and the summary says selection used training
    assert result.history["val_accuracy"] == [None] * 15 and result.history["val_loss"] == [None] * 15
    assert result.summary["selected_on"] == "training"
    assert result.summary["best_val_accuracy"] == pytest.approx(max(result.history["train_accuracy"]), abs=1e-6)


def test_without_validation_checkpoints_name_their_training_selection(tiny, tmp_path):
    """No validation split: the checkpoint's selection metric is called train_accuracy, "best" restores the
    best training epoch's weights and says which epoch they are."""
    cfg = FAST.replace(epochs=3, val_size=0, learning_rate=0.05)
    result = fit(cfg, tiny, checkpoint_dir=str(tmp_path / "ck"), progress=False)
    manager = checkpoint_manager(tmp_path / "ck")
    saved = {step: manager.metrics(step) for step in manager.all_steps()}
    assert saved and all(set(m) == {"train_accuracy"} for m in saved.values()), saved
    trained = load_trained(tmp_path / "ck", "best")
    assert trained.epoch == result.summary["best_epoch"] and trained.checkpoint_step >= trained.epoch


def test_same_seed_same_numbers_other_seed_differs(tiny):
    cfg = FAST.replace(augment=("flip", "crop"), dropout_rate=0.3)
    a = fit(cfg, tiny, progress=False)
    b = fit(cfg, tiny, progress=False)
    c = fit(cfg.replace(seed=1), tiny, progress=False)
    assert strip_times(a.histories) == strip_times(b.histories)
    assert a.summaries == b.summaries
    assert a.history["train_loss"] != c.history["train_loss"]
    assert len(a.history["interval"]["loss"]) == 2 * (448 // 32 // 4)


def test_interrupted_and_resumed_equals_uninterrupted(tiny, tmp_path):
    cfg = FAST.replace(epochs=3, augment=("flip",), dropout_rate=0.2, plateau_patience=1)
    full = fit(cfg, tiny, progress=False)
    interrupt_after(cfg, tiny, tmp_path / "ck", 2)
    resumed = fit(cfg, tiny, checkpoint_dir=str(tmp_path / "ck"), progress=False)
    assert full.meta["epoch_compilations"] == 0 == resumed.meta["epoch_compilations"]  # all compiled up front
    assert strip_times(resumed.histories) == strip_times(full.histories)
    assert resumed.summaries == full.summaries
    chex.assert_trees_all_equal(resumed.state.params, full.state.params)
    with pytest.raises(ConfigError, match=r"written with another learning_rate \(0.01 -> 0.5\)"):
        fit(cfg.replace(learning_rate=0.5), tiny, checkpoint_dir=str(tmp_path / "ck"), progress=False)


def test_checkpoint_every_two_epochs_resumes_exactly_from_the_last_saved(tiny, tmp_path):
    cfg = FAST.replace(epochs=4, checkpoint_every=2, augment=("flip",))
    full = fit(cfg, tiny, progress=False)
    interrupt_after(cfg, tiny, tmp_path / "ck", 3)
    assert checkpoint_manager(tmp_path / "ck").all_steps() == [2]  # epoch 3 was not saved
    resumed = fit(cfg, tiny, checkpoint_dir=str(tmp_path / "ck"), progress=False)
    assert strip_times(resumed.histories) == strip_times(full.histories)
    chex.assert_trees_all_equal(resumed.state.params, full.state.params)
    assert checkpoint_manager(tmp_path / "ck").all_steps() == [2, 4]  # the last epoch is always saved


def test_restored_checkpoint_gives_identical_predictions_and_fine_tunes(tiny, tmp_path):
    cfg = FAST.replace(model_kwargs={"batch_norm": True})
    result = fit(cfg, tiny, checkpoint_dir=str(tmp_path / "ck"), progress=False)
    data = prepare_data(tiny, cfg)
    fns = build(cfg, data)
    target = init_state(cfg, fns)
    restored, meta = restore(tmp_path / "ck", target, "latest")
    images = data.test[0][:16]
    np.testing.assert_array_equal(fns.probabilities(restored.variables, images),
                                  result.fns.probabilities(result.state.variables, images))
    best, _ = restore(tmp_path / "ck", target, "best")
    best_history = restore(tmp_path / "ck", target, "best")[1]["histories"][0]["val_accuracy"]
    assert best_history[-1] == max(result.history["val_accuracy"])  # "best" is a top validation epoch
    assert int(best.epoch) == len(best_history)
    assert meta["histories"][0]["val_accuracy"] == result.history["val_accuracy"]
    # Fine-tune: the CIFAR-10 body under a fresh 100-class head.
    fns100 = build(cfg, data.__class__(**{**data.__dict__, "num_classes": 100}))
    fresh = init_state(cfg, fns100).params
    tuned = load_body(fresh, restored.params)
    chex.assert_trees_all_equal(tuned["conv0_0"], restored.params["conv0_0"])
    chex.assert_shape(tuned["head"]["kernel"], (512, 100))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        restore(tmp_path / "missing", target)


def test_plateau_lowers_the_learning_rate(tiny):
    cfg = FAST.replace(epochs=4, learning_rate=1e-7, plateau_patience=1, plateau_factor=0.5)
    lrs = fit(cfg, tiny, progress=False).history["lr"]
    assert lrs[-1] < lrs[0] * 0.9, lrs


def test_schedules_change_the_learning_rate(tiny):
    lrs = fit(FAST.replace(epochs=3, schedule="cosine"), tiny, progress=False).history["lr"]
    assert lrs[0] > lrs[1] > lrs[2]


@pytest.mark.parametrize("change,match", [
    ({"dropout_rate": 1.0}, "dropout rate"), ({"learning_rate": 0.0}, "learning rate"),
    ({"optimizer": "lamb"}, "unknown optimizer"), ({"model": "vgg"}, "unknown model"),
    ({"model_kwargs": {"activation": "swish2"}}, "unknown activation"), ({"batch_size": 10_000}, "larger than"),
])
def test_invalid_configs_fail_before_compiling(tiny, change, match):
    with pytest.raises(ConfigError, match=match):
        fit(FAST.replace(**change), tiny, progress=False)


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tiny, tmp_path):
    # Epoch 1 trains normally; the step schedule multiplies the lr by 1e30 from epoch 2 on.
    cfg = FAST.replace(epochs=3, schedule="step", step_epochs=(1,), step_factor=1e30)
    ck = tmp_path / "ck"
    with pytest.raises(TrainingError, match="NaN/inf in epoch 2: the last good checkpoint is epoch 1 in .*allow_") as e:
        fit(cfg, tiny, checkpoint_dir=str(ck), progress=False)
    assert "--allow-config-change learning_rate,grad_clip_norm" in e.value.cli  # the experiments' wording
    data = prepare_data(tiny, cfg)
    fns = build(cfg, data)
    restored, meta = restore(ck, init_state(cfg, fns), "latest")
    assert int(restored.epoch) == 1 and len(meta["histories"][0]["epoch"]) == 1
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(restored.params))


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_runs_in_one_program_match_single_runs(tiny, strategy):
    cfg = FAST.replace(epochs=1, augment=("flip",), run_strategy=strategy)
    runs = [{"seed": 0, "dropout_rate": 0.0}, {"seed": 1, "dropout_rate": 0.5}]
    swept = fit(cfg, tiny, runs=runs, progress=False)
    assert swept.meta["run_strategy"] == strategy and swept.run_axis and swept.meta["epoch_compilations"] == 0
    singles = []
    for k, run in enumerate(runs):
        single = fit(cfg.replace(**run, split_seed=0), tiny, progress=False)  # the sweep shares one split
        if strategy == "loop":  # the same operations as the single run: equal to float rounding
            # Equal ops give equal bits on any CPU; only a fusion of the larger program re-associating a
            # reduction (~1e-7 relative) can differ, grown over 14 SGD steps to ~1e-6 of the loss, ~1e-5 of
            # a parameter (atol for those near 0).
            np.testing.assert_allclose(swept.histories[k]["train_loss"], single.history["train_loss"], rtol=1e-5)
            chex.assert_trees_all_close(unstack_state(swept.state, k).params, single.state.params, rtol=1e-4,
                                        atol=1e-5)
            continue
        # vmap turns the convolutions into grouped ones with another summation order: see conftest's
        # VMAP_LOSS_RTOL. Biases start at 0, so their norm is the update itself: each leaf within 2 % by norm.
        for a, b in zip(jax.tree.leaves(unstack_state(swept.state, k).params), jax.tree.leaves(single.state.params),
                        strict=True):
            assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 2e-2
        # A validation prediction flips only at a logit margin below that difference: one of the 64 at most.
        assert swept.histories[k]["val_accuracy"] == pytest.approx(single.history["val_accuracy"], abs=1 / 64)
        singles.append(single.history["train_loss"])
    if strategy == "vmap":
        assert_matches_own_run_only([h["train_loss"] for h in swept.histories], singles)
    assert swept.histories[0]["train_loss"] != swept.histories[1]["train_loss"]


def test_per_run_splits_match_single_runs_with_their_own_split(tiny):
    """With split_per_run each run holds out its own validation set (seeded by its seed): run k equals the
    single run with seed k and split_seed k. Raw input, so both normalize alike."""
    cfg = FAST.replace(epochs=1, run_strategy="loop", split_per_run=True, normalize=False)
    runs = [{"seed": 3}, {"seed": 4}]
    swept = fit(cfg, tiny, runs=runs, progress=False)
    assert swept.meta["split_per_run"] and swept.meta["train_size"] == 512 - 64
    for k, run in enumerate(runs):
        single = fit(cfg.replace(seed=run["seed"], split_seed=run["seed"]), tiny, progress=False)
        # The loop strategy: as in test_runs_in_one_program_match_single_runs.
        np.testing.assert_allclose(swept.histories[k]["train_loss"], single.history["train_loss"], rtol=1e-5)
        np.testing.assert_allclose(swept.histories[k]["val_loss"], single.history["val_loss"], rtol=1e-5)
    shared = fit(cfg.replace(split_per_run=False, split_seed=3), tiny, runs=runs, progress=False)
    # Run 0 trains on the same split either way (float rounding only, as above); run 1's validation set is
    # another one, whose loss differs by far more than rounding (1e-3 is 100 times the rounding above).
    assert shared.histories[0]["train_loss"] == pytest.approx(swept.histories[0]["train_loss"], rel=1e-5)
    assert shared.histories[1]["val_loss"] != pytest.approx(swept.histories[1]["val_loss"], rel=1e-3)


def test_run_groups_checkpoint_and_resume_exactly(tiny, tmp_path):
    """Three runs, two per compiled group: interrupted after epoch 1 and resumed == uninterrupted; the
    groups' results equal one program holding all three runs."""
    cfg = FAST.replace(run_strategy="loop", runs_per_chunk=2)
    runs = [{"seed": s} for s in range(3)]
    ck = tmp_path / "ck"
    fit(cfg.replace(epochs=1), tiny, runs=runs, checkpoint_dir=str(ck), progress=False)
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["runs_0000-0001", "runs_0002-0002"]
    assert (ck / "metrics.jsonl").is_file()
    resumed = fit(cfg, tiny, runs=runs, checkpoint_dir=str(ck), progress=False)
    whole = fit(cfg.replace(runs_per_chunk=None), tiny, runs=runs, progress=False)
    assert resumed.meta["runs_per_chunk"] == 2 and whole.meta["runs_per_chunk"] == 3
    assert strip_times(resumed.histories) == strip_times(whole.histories)
    assert resumed.summaries == whole.summaries
    chex.assert_trees_all_equal(resumed.state.params, whole.state.params)


def test_load_trained_restores_best_weights_for_prediction(tiny, tmp_path):
    cfg = FAST.replace(normalize=False)
    result = fit(cfg, tiny, checkpoint_dir=str(tmp_path / "ck"), progress=False)
    trained = load_trained(tmp_path / "ck")
    assert trained.config == cfg and trained.epoch == result.summary["best_epoch"]
    images = np.asarray(tiny.test.images[:16])
    expect = jax.jit(result.fns.probabilities)(result.state.best_variables, images)
    # Restored weights are bit-identical; the prediction program may batch and fuse otherwise: logits move by
    # a few roundings (random-rounding estimate ~1e-7 relative), probabilities by as much.
    np.testing.assert_allclose(trained.probabilities(images), expect, rtol=1e-6, atol=1e-7)
    # Other input layouts research code passes: one HWC image, [0, 1] floats; the rest is a clear error.
    np.testing.assert_allclose(trained.probabilities(images[3]), expect[3:4], rtol=1e-6, atol=1e-7)
    # [0, 1] floats: x / 255 computed on the host in float64 then cast, against uint8 / 255 in float32: one
    # rounding (6e-8) of every input, through the net's ~4 layers (x 10 for the sums' growth): 1e-5.
    np.testing.assert_allclose(trained.probabilities(images / 255.0), expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(trained.predict(images), np.asarray(expect).argmax(-1))
    for bad, match in ((images.astype(np.float32), "floats up to 255.*images / 255"),
                       (images.transpose(0, 3, 1, 2), "NCHW.*transpose"), (images[:, :28, :28], "28x28x3.*resize"),
                       (images / 127.5 - 1.0, "negative values.*normalizes them itself")):
        with pytest.raises(DataError, match=match):
            trained.probabilities(bad)
    assert result.meta["normalization"] == {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def test_fine_tuning_starts_from_the_trained_body(tiny):
    trained = fit(FAST.replace(epochs=1), tiny, progress=False).state
    tuned = fit(FAST.replace(epochs=1, learning_rate=1e-12, seed=5), tiny, progress=False,
                body={"params": trained.params, "batch_stats": trained.batch_stats})
    fresh = fit(FAST.replace(epochs=1, learning_rate=1e-12, seed=5), tiny, progress=False)
    body = {k: v for k, v in tuned.state.params.items() if k != "head"}
    # A learning rate of 1e-12 moves weights of size ~0.1 by ~1e-12 per step x 14 steps: far below 1e-6,
    # which any real use of the trained body (or of a trained head) would exceed by orders of magnitude.
    chex.assert_trees_all_close(body, {k: v for k, v in trained.params.items() if k != "head"}, atol=1e-6)
    chex.assert_trees_all_close(tuned.state.params["head"], fresh.state.params["head"], atol=1e-6)  # new head
    assert tuned.meta["fine_tuned"] and not fresh.meta["fine_tuned"]


def test_a_redefined_model_class_gets_a_new_program(tiny, monkeypatch):
    """The program cache keys on the registered model's identity, not only its name: redefining the class
    behind a name trains the new architecture, not the cached old one."""
    import flax.linen as nn

    from jaxcifar import models

    def define(kernel: int, width: int):
        class Tiny(nn.Module):
            num_classes: int = 10
            dtype: object = jnp.float32

            @nn.compact
            def __call__(self, x, train: bool = False, dropout_rate=None):
                x = nn.Conv(width, (kernel, kernel), name="conv")(x)
                return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))

        return Tiny

    cfg = FAST.replace(model="tiny_test_net", epochs=1)
    monkeypatch.setitem(models.MODELS, "tiny_test_net", define(3, 8))
    first = fit(cfg, tiny, progress=False)
    monkeypatch.setitem(models.MODELS, "tiny_test_net", define(5, 32))
    second = fit(cfg, tiny, progress=False)
    assert first.state.params["conv"]["kernel"].shape == (3, 3, 3, 8)
    assert second.state.params["conv"]["kernel"].shape == (5, 5, 3, 32)
