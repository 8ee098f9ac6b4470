"""A resume goes on with exactly what wrote the checkpoint, or says what changed; a finished sweep is read back
for analysis without training code; robustness figures stay within a variant; the first errors a researcher
meets name the fix (issue 33)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from conftest import strip_times
from flax import nnx

from jaxcifar.compare import compare
from jaxcifar.errors import ConfigError
from jaxcifar.robustness import evaluate_robustness
from jaxcifar.robustness_report import write_robustness_report
from jaxcifar.train import CompileClock, ResumeFrom, TrainConfig, fit, load_sweep, loop
from jaxcifar.train import checkpoint as ckpt
from jaxcifar.train.fingerprint import fingerprint
from jaxcifar.train.losses import cross_entropy

FAST = TrainConfig(epochs=1, batch_size=32, val_size=64, log_every=4, unroll=2,
                   eval_batch_size=64, keep_checkpoints=5)
RESUME = {"progress": False}


def copied(directory, tmp_path) -> str:
    shutil.copytree(directory, tmp_path / "ck")
    return str(tmp_path / "ck")


# ------------------------------------------------------------------------------------------- fingerprints


def test_fingerprints_tell_optimizers_apart_and_agree_across_processes():
    code = ("import optax; from jaxcifar.train.fingerprint import fingerprint; "
            "print(fingerprint(optax.adamw(2e-3)), fingerprint(optax.adamw(1e-2)), fingerprint(optax.lion(1e-4)))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    here = [fingerprint(optax.adamw(2e-3)), fingerprint(optax.adamw(1e-2)), fingerprint(optax.lion(1e-4))]
    assert other == here and len(set(here)) == 3
    assert fingerprint(optax.sgd(optax.cosine_decay_schedule(0.1, 100))) != fingerprint(
        optax.sgd(optax.cosine_decay_schedule(0.1, 200)))  # a schedule's length sits in a closure


@pytest.fixture(scope="module")
def adamw(tiny, tmp_path_factory):
    directory = tmp_path_factory.mktemp("adamw") / "ck"
    fit(FAST, tiny, checkpoint_dir=str(directory), tx=optax.adamw(2e-3), **RESUME)
    return directory


def test_another_optimizer_is_refused_by_name_unless_allowed(adamw, tiny, tmp_path):
    ck = copied(adamw, tmp_path)
    longer = FAST.replace(epochs=2)
    with pytest.raises(ConfigError, match=r"written with another optimizer \(tx\): allow it with "
                       r"resume=ResumeFrom\(allow_changes=\('tx',\)\)") as e:
        fit(longer, tiny, checkpoint_dir=ck, tx=optax.adamw(1e-2), **RESUME)
    assert "\n" not in str(e.value)
    allow = ResumeFrom(allow_changes=("tx",))
    result = fit(longer, tiny, checkpoint_dir=ck, tx=optax.adamw(1e-2), resume=allow, **RESUME)
    assert result.history["epoch"] == [1, 2] and list(result.meta["config_changes"][0]["changes"]) == ["tx"]
    # another optimizer's state never restores into this one (no partial restore), even when the change is allowed
    with pytest.raises(ConfigError, match="optimizer state in .* is not this optimizer's"):
        fit(FAST.replace(epochs=3), tiny, checkpoint_dir=ck, tx=optax.lion(1e-4), resume=allow, **RESUME)


def test_the_same_optimizer_built_again_resumes(adamw, tiny, tmp_path):
    result = fit(FAST.replace(epochs=2), tiny, checkpoint_dir=copied(adamw, tmp_path), tx=optax.adamw(2e-3),
                 **RESUME)
    assert result.meta["config_changes"] == [] and result.history["epoch"] == [1, 2]


def scaled_loss(scale: float):
    def loss(logits, labels):
        return scale * cross_entropy(logits, labels)
    return loss


def accuracy_metric(shift: int):
    def metrics(logits, labels):
        return {"hit": (logits.argmax(-1) == (labels + shift) % logits.shape[-1]).astype(np.float32)}
    return metrics


def mirrored(flip: bool):
    def augment(key, images):
        return images[:, :, ::-1] if flip else images
    return augment


@pytest.mark.parametrize("piece", ["loss_fn", "metrics_fn", "augment"])
def test_a_changed_function_of_the_same_name_is_refused_by_name(tiny, tmp_path_factory, piece):
    """The functions keep their names (a notebook cell edited and run again); their closures changed."""
    directory = tmp_path_factory.mktemp(piece) / "ck"
    pieces = {"loss_fn": scaled_loss(1.0), "metrics_fn": accuracy_metric(0)}
    config = FAST.replace(augment=(mirrored(False),))
    fit(config, tiny, checkpoint_dir=str(directory), **pieces, **RESUME)
    changed = {"loss_fn": {"loss_fn": scaled_loss(2.0)}, "metrics_fn": {"metrics_fn": accuracy_metric(1)},
               "augment": {}}[piece]
    if piece == "augment":
        config = config.replace(augment=(mirrored(True),))
    named = {"loss_fn": "loss_fn", "metrics_fn": "metrics_fn", "augment": r"augmentation function\(s\)"}[piece]
    with pytest.raises(ConfigError, match=f"written with another {named}: "):
        fit(config.replace(epochs=2), tiny, checkpoint_dir=str(directory), **{**pieces, **changed}, **RESUME)
    result = fit(config.replace(epochs=2), tiny, checkpoint_dir=str(directory), **{**pieces, **changed},
                 resume=ResumeFrom(allow_changes=(piece,)), **RESUME)
    assert list(result.meta["config_changes"][0]["changes"]) == [piece]


def test_more_epochs_under_a_schedule_laid_out_over_them_is_refused_unless_allowed(tiny, tmp_path):
    ck = str(tmp_path / "ck")
    cosine = FAST.replace(schedule="cosine", learning_rate=0.05)
    fit(cosine, tiny, checkpoint_dir=ck, **RESUME)
    with pytest.raises(ConfigError, match=r"another epochs \(1 -> 2; .*goes on from the current step"):
        fit(cosine.replace(epochs=2), tiny, checkpoint_dir=ck, **RESUME)
    result = fit(cosine.replace(epochs=2), tiny, checkpoint_dir=ck, resume=ResumeFrom(allow_changes=("epochs",)),
                 **RESUME)
    assert result.meta["config_changes"] == [{"resumed_after_epoch": 1, "changes": {"epochs": [1, 2]}}]
    # a factory that lays its own schedule out over config.epochs builds another optimizer: refused as such
    factory = lambda c, spe: optax.sgd(optax.cosine_decay_schedule(0.05, c.epochs * spe))  # noqa: E731
    own = str(tmp_path / "own")
    fit(FAST, tiny, checkpoint_dir=own, tx=factory, **RESUME)
    with pytest.raises(ConfigError, match=r"another optimizer \(tx\)"):
        fit(FAST.replace(epochs=2), tiny, checkpoint_dir=own, tx=factory, **RESUME)


# --------------------------------------------------------------------------- a finished sweep, for analysis

RUNS = [{"seed": s, "learning_rate": lr} for lr in (0.01, 0.05) for s in (0, 1)]


@pytest.fixture(scope="module")
def sweep(tiny, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sweep") / "ck"
    return directory, fit(FAST.replace(epochs=2), tiny, runs=RUNS, checkpoint_dir=str(directory), **RESUME)


def test_load_sweep_reads_a_finished_sweep_without_compiling(sweep):
    directory, trained = sweep
    with CompileClock() as clock:
        loaded = load_sweep(directory)
    assert clock.compiles == 0
    assert loaded.runs == trained.runs and loaded.summaries == trained.summaries
    assert strip_times(loaded.histories) == strip_times(trained.histories)
    chex.assert_trees_all_equal(loaded.state.weights("best"), jax.device_get(trained.state.weights("best")))
    as_text = lambda x: json.dumps(x, default=str)  # noqa: E731  (NaN-safe equality)
    assert as_text(compare(loaded, by="learning_rate")) == as_text(compare(trained, by="learning_rate"))


def test_reopening_a_finished_sweep_probes_no_memory_and_counts_every_compile(sweep, tiny, tmp_path, monkeypatch):
    directory, trained = sweep

    def probe(*args, **kwargs):
        raise AssertionError("the memory probe compiled a training chunk for a finished sweep")

    monkeypatch.setattr(loop, "_group_size_that_fits", probe)
    with CompileClock() as clock:
        again = fit(FAST.replace(epochs=2), tiny, runs=RUNS, checkpoint_dir=copied(directory, tmp_path), **RESUME)
    assert again.meta["compilations"] == clock.compiles and again.meta["epoch_compilations"] == 0
    assert again.summaries == trained.summaries


def test_robustness_of_a_sweep_is_reported_per_variant(sweep, tiny, tmp_path):
    directory, _ = sweep
    figures = evaluate_robustness(load_sweep(directory), tiny.test, corruptions=["contrast"], severities=[5],
                                  progress=False)
    parts = figures["variants"]
    assert [p["variant"] for p in parts] == [{"learning_rate": 0.01}, {"learning_rate": 0.05}]
    assert [p["runs"] for p in parts] == [[0, 1], [2, 3]]
    for p in parts:  # two seeds each: the ensemble and the mean +- std are over that variant's seeds only
        assert len(p["clean"]["accuracy"]) == 2 == len(p["corruptions"]["mean_accuracy"])
        assert p["clean"]["summary"]["accuracy"]["n"] == 2
    paragraphs = write_robustness_report(tmp_path, figures, [f"run {i}" for i in range(4)], tiny.class_names)
    assert "evaluated apart" in paragraphs[0] and "# Variant 1: learning_rate 0.05 (2 runs)" in paragraphs
    assert (tmp_path / "variant1_corruptions.png").is_file()


def test_a_checkpoint_whose_checksum_file_is_gone_is_damaged(sweep, tiny, tmp_path, capfd):
    directory, _ = sweep
    ck = copied(directory, tmp_path)
    step = tmp_path / "ck" / "2"
    (step / ckpt.CHECKSUMS).unlink()
    largest = max((p for p in step.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x10
    largest.write_bytes(bytes(data))
    result = fit(FAST.replace(epochs=2), tiny, runs=RUNS, checkpoint_dir=ck, **RESUME)
    err = capfd.readouterr().err
    assert f"/2 is damaged: its checksum file {ckpt.CHECKSUMS} is missing" in err
    assert (tmp_path / "ck" / "damaged" / "2").is_dir() and result.history["epoch"] == [1, 2]


# --------------------------------------------------------------------------------------- the first errors


class Examples(nn.Module):
    """Written flax-examples style: ``train`` defaults to True, batch norm and a dropout layer."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
        return nn.Dense(10)(nn.Dropout(0.1, deterministic=not train)(x.mean((1, 2))))


class NnxExamples(nnx.Module):
    """The same in Flax NNX, brought in through ``nnx.bridge.to_linen``, whose ``__call__(*args, **kwargs)``
    shows no ``train`` argument."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x, train: bool = True):
        x = nnx.relu(self.bn(self.conv(x), use_running_average=not train))
        return self.head(self.drop(x.mean((1, 2)), deterministic=not train))


@pytest.mark.parametrize("model", [Examples(), nnx.bridge.to_linen(NnxExamples)], ids=["linen", "to_linen"])
def test_modules_written_as_in_the_flax_examples_train(tiny, model):
    """Evaluation passes train=False explicitly (a module that defaults it to True would update its batch
    statistics there, which Flax refuses), and a ``**kwargs`` signature is taken when the call works."""
    result = fit(FAST, tiny, model=model, **RESUME)
    assert np.isfinite(result.summary["test_loss"]) and "batch_stats" in result.state.variables
    with pytest.raises(ConfigError, match=r"\.__call__ takes no dropout_rate"):
        fit(FAST.replace(dropout_rate=0.2), tiny, model=model, **RESUME)


def test_arrays_given_as_the_dataset_point_to_from_arrays(tiny):
    with pytest.raises(ConfigError, match=r"fit takes a jaxcifar Dataset, got tuple: wrap arrays with "
                                          r"Dataset.from_arrays"):
        fit(FAST, (tiny.train.images, tiny.train.labels), **RESUME)
