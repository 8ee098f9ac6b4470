"""Data parallelism and run-axis sharding on 4 forced CPU devices (in a subprocess: the device count is fixed
when JAX starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import once_per_session

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json, sys
    import jaxcifar
    import jax
    from jaxcifar.data.synthetic import synthetic_cifar
    from jaxcifar.errors import ConfigError
    from jaxcifar.train import TrainConfig, fit
    out = {"devices": len(jax.devices())}
    data = synthetic_cifar(512, 128)
    # A small MLP: what is tested is how batches, gradients and runs are split over devices, which does not
    # depend on the layers (a conv net only costs compile time here).
    cfg = TrainConfig(epochs=2, batch_size=32, val_size=64, learning_rate=0.01, log_every=4, unroll=2,
                      eval_batch_size=64, model="mlp", model_kwargs={"hidden": [64]})
    r4 = fit(cfg.replace(devices=4, epochs=1), data, progress=False)
    r1 = fit(cfg.replace(devices=1, epochs=1), data, progress=False)
    out["loss"] = [r4.history["interval"]["loss"], r1.history["interval"]["loss"]]
    out["val"] = [r4.history["val_accuracy"], r1.history["val_accuracy"]]
    out["param_devices"] = len(jax.tree.leaves(r4.state.params)[0].sharding.device_set)
    try:
        fit(cfg.replace(devices=3), data, progress=False)
    except ConfigError as e:
        out["error"] = str(e)
    # Saved by a 4-device run, resumed on 1 device; compared with 4 devices throughout.
    fit(cfg.replace(devices=4, epochs=1), data, checkpoint_dir=sys.argv[1], progress=False)
    resumed = fit(cfg.replace(devices=1), data, checkpoint_dir=sys.argv[1], progress=False)
    whole = fit(cfg.replace(devices=4), data, progress=False)
    out["resumed"] = [resumed.history["train_loss"], whole.history["train_loss"]]
    out["resumed_devices"] = len(jax.tree.leaves(resumed.state.params)[0].sharding.device_set)
    # A vmapped sweep of 4 seeds with its run axis sharded: one run per device, no communication.
    sweep = cfg.replace(epochs=1, run_strategy="vmap")
    runs = [{"seed": s} for s in range(4)]
    sharded = fit(sweep.replace(devices=4), data, runs=runs, progress=False)
    single_device = fit(sweep.replace(devices=1), data, runs=runs, progress=False)
    leaf = jax.tree.leaves(sharded.state.params)[0]
    out["runs_mode"] = [sharded.meta["parallel"], single_device.meta["parallel"]]
    out["runs_shards"] = [len(leaf.sharding.device_set), leaf.addressable_shards[0].data.shape[0], leaf.shape[0]]
    out["runs_loss"] = [[h["train_loss"] for h in r.histories] for r in (sharded, single_device)]
    out["runs_val"] = [[h["val_accuracy"] for h in r.histories] for r in (sharded, single_device)]
    try:
        fit(sweep.replace(devices=4, parallel="runs"), data, runs=runs[:3], progress=False)
    except ConfigError as e:
        out["runs_error"] = str(e)
    print("RESULT" + json.dumps(out))
''')


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    def run() -> dict:
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
        ck = tmp_path_factory.mktemp("ck") / "run"
        r = subprocess.run([sys.executable, "-c", SCRIPT, str(ck)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.split("RESULT", 1)[1])

    return once_per_session(tmp_path_factory, "four_devices", run)


def test_four_devices_match_one_device(four_devices):
    assert four_devices["devices"] == 4 and four_devices["param_devices"] == 4
    # The same global batch of 32: each device takes 8 and the gradients are all-reduced. Only the float
    # summation order differs (per-device partial sums), so the losses agree to ~1e-6 per step, growing
    # with training to <1e-3 relative over the first epoch's 14 steps.
    four, one = four_devices["loss"]
    assert len(four) == len(one) == 3
    for a, b in zip(four, one, strict=True):
        assert abs(a - b) <= 1e-3 * abs(b)
    # A validation prediction flips only where its two largest logits are closer than that float-level
    # difference: at most one of the 64 images (as in the sweep below).
    assert four_devices["val"][0] == pytest.approx(four_devices["val"][1], abs=1 / 64)


def test_indivisible_global_batch_is_rejected(four_devices):
    assert four_devices["error"] == ("global batch 32 does not divide over 3 devices: use a multiple of 3 "
                                     "(or fewer devices)")


def test_checkpoint_from_four_devices_resumes_on_one(four_devices):
    assert four_devices["resumed_devices"] == 1
    resumed, whole = four_devices["resumed"]
    assert resumed[0] == whole[0]  # epoch 1 restored from the 4-device checkpoint, bit for bit
    assert abs(resumed[1] - whole[1]) <= 1e-3 * abs(whole[1])  # epoch 2 on 1 device vs 4: summation order


def test_sweep_shards_its_runs_over_four_devices(four_devices):
    assert four_devices["runs_mode"] == ["runs", "data"]
    assert four_devices["runs_shards"] == [4, 1, 4]  # 4 devices, each holding 1 of the 4 runs
    # Each device computes its run with the same operations as the one-device vmapped program, except that
    # XLA may group the per-run matrix products differently: float rounding only, 1e-6 relative per step,
    # below 1e-4 after one epoch's 14 steps.
    sharded, single = four_devices["runs_loss"]
    for a, b in zip(sharded, single, strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    for a, b in zip(*four_devices["runs_val"], strict=True):
        assert a == pytest.approx(b, abs=1 / 64)  # at most one of the 64 validation images flips
    assert len({tuple(x) for x in sharded}) == 4  # the seeds differ


def test_indivisible_run_count_is_rejected(four_devices):
    assert four_devices["runs_error"] == ("run groups of [3] do not divide over 4 devices: use a multiple of 4 "
                                          "runs (and runs_per_chunk), or parallel='data'")
