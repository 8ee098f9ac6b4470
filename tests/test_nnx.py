"""Flax NNX models through fit, natively (nnx.split / nnx.merge): seeds and dropout rates swept in one program
on the GPU defaults, each run its own single run; checkpoints, exact resume, loading, prediction, fine-tuning
and robustness; clear errors for what breaks the protocol (issue 32)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import interrupt_after, strip_times, sweep_matches_single_runs
from flax import nnx

from jaxcifar.errors import ConfigError
from jaxcifar.robustness import evaluate_robustness
from jaxcifar.train import TrainConfig, fit, load_trained, unstack_state

FAST = TrainConfig(epochs=2, batch_size=32, val_size=64, learning_rate=0.02, log_every=4, unroll=2,
                   eval_batch_size=64)


class NnxCNN(nnx.Module):
    """Batch norm, an ``nnx.Dropout`` layer, dropout at a rate fit sets per run, a classifier named ``head``."""

    def __init__(self, rngs: nnx.Rngs, width: int = 8, num_classes: int = 10):
        self.conv = nnx.Conv(3, width, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.rngs = rngs
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x, train: bool = False, dropout_rate=None):
        x = self.drop(nnx.relu(self.bn(self.conv(x), use_running_average=not train)), deterministic=not train)
        x = nnx.max_pool(x, (4, 4), (4, 4)).mean((1, 2))
        if train and dropout_rate is not None:  # a traced rate: each run of a sweep has its own
            keep = jax.random.bernoulli(self.rngs.dropout(), 1 - dropout_rate, x.shape)
            x = jnp.where(keep, x / (1 - dropout_rate), 0)
        return self.head(x)


RUNS = [{"seed": 0, "dropout_rate": 0.1}, {"seed": 1, "dropout_rate": 0.4}]


def test_an_nnx_sweep_on_the_gpu_defaults_equals_its_single_runs(tiny):
    """vmap over runs and a scanned epoch, as on a GPU: each run has its own initialization, dropout stream and
    batch statistics, and equals the single run with its seed and rate."""
    config = FAST.replace(run_strategy="vmap", loop="scan")
    sweep = fit(config, tiny, runs=RUNS, model=NnxCNN, progress=False)
    first, second = (unstack_state(sweep.state, k) for k in range(2))
    assert not np.allclose(first.params["conv"]["kernel"], second.params["conv"]["kernel"])
    assert set(first.batch_stats["bn"]) == {"mean", "var"}
    sweep_matches_single_runs(sweep, config.replace(split_seed=0), tiny, RUNS, model=NnxCNN)  # one shared split
    figures = evaluate_robustness(sweep, tiny.test, corruptions=["contrast"], severities=[5], progress=False)
    assert [v["runs"] for v in figures["variants"]] == [[0], [1]]  # two rates: two variants


def test_an_nnx_run_resumes_exactly_loads_predicts_and_fine_tunes(tiny, tmp_path):
    model = functools.partial(NnxCNN, width=8)
    full = fit(FAST, tiny, model=model, progress=False)
    interrupt_after(FAST, tiny, tmp_path / "ck", 1, model=model)
    resumed = fit(FAST, tiny, model=model, checkpoint_dir=str(tmp_path / "ck"), progress=False)
    assert strip_times(resumed.histories) == strip_times(full.histories)  # CPU: bit for bit
    chex.assert_trees_all_equal(resumed.state.params, full.state.params)
    trained = load_trained(tmp_path / "ck", "latest", model=model)
    probabilities = trained.probabilities(tiny.test.images)
    assert probabilities.shape == (len(tiny.test), 10)
    accuracy = float((probabilities.argmax(-1) == tiny.test.labels).mean())
    # The prediction program batches otherwise than the evaluation: the same probabilities up to a few roundings
    # (~1e-6, as in test_train's load_trained check). Only an image whose two largest probabilities lie within
    # 1e-5 (a factor 5 above that) may change its prediction, so the accuracies differ by at most those images.
    top2 = np.sort(np.asarray(probabilities, np.float64), axis=-1)[:, -2:]
    near_ties = int((top2[:, 1] - top2[:, 0] < 1e-5).sum())
    assert abs(accuracy - resumed.summary["final_test_accuracy"]) <= (near_ties + 1e-6) / len(tiny.test)
    with pytest.raises(Exception, match="fields differ|another model"):
        load_trained(tmp_path / "ck", model=functools.partial(NnxCNN, width=16))
    tuned = fit(FAST.replace(epochs=1), tiny, model=model, body=trained.variables, progress=False)
    chex.assert_trees_all_equal(tuned.history["epoch"], [1])


class WithCache(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.head = nnx.Linear(3, 10, rngs=rngs)
        self.seen = nnx.Variable(jnp.zeros(()))

    def __call__(self, x, train: bool = False):
        return self.head(x.mean((1, 2)))


def test_nnx_protocol_errors_say_the_fix(tiny):
    with pytest.raises(ConfigError, match=r"has its weights already.*model=lambda rngs: NnxCNN\(\.\.\., rngs=rngs\)"):
        fit(FAST, tiny, model=NnxCNN(nnx.Rngs(0)), progress=False)
    with pytest.raises(ConfigError, match=r"WithCache keeps state of kinds \['Variable'\]"):
        fit(FAST, tiny, model=WithCache, progress=False)
    with pytest.raises(ConfigError, match="Plain.__call__ takes no dropout_rate"):
        fit(FAST.replace(dropout_rate=0.2), tiny, model=lambda rngs: Plain(rngs), progress=False)


class Plain(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.head = nnx.Linear(3, 10, rngs=rngs)

    def __call__(self, x, train: bool = False):
        return self.head(x.mean((1, 2)))


WIDTH = {"value": 8}


def test_compiled_programs_are_keyed_on_the_graph():
    """The same constructor building the same graph shares programs; one whose graph changed (it reads a global)
    does not, so a stale program is never reused."""
    from jaxcifar.train.components import Components, cache_identity

    def make(rngs):
        return NnxCNN(rngs, width=WIDTH["value"])

    before = Components(model=make).identity()
    assert Components(model=make).identity() == before
    WIDTH["value"] = 16
    try:
        assert Components(model=make).identity() != before
    finally:
        WIDTH["value"] = 8
    assert cache_identity(Components(model=NnxCNN).model) != cache_identity(Components(model=Plain).model)
