"""Data parallelism on 4 forced CPU devices (in a subprocess: the device count is fixed when JAX starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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
    cfg = TrainConfig(epochs=2, batch_size=32, val_size=64, learning_rate=0.01, log_every=4, unroll=2,
                      eval_batch_size=64)
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
    print("RESULT" + json.dumps(out))
''')


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    ck = tmp_path_factory.mktemp("ck") / "run"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(ck)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("RESULT", 1)[1])


def test_four_devices_match_one_device(four_devices):
    assert four_devices["devices"] == 4 and four_devices["param_devices"] == 4
    # The same global batch of 32: each device takes 8 and the gradients are all-reduced. Only the float
    # summation order differs (per-device partial sums), so the losses agree to ~1e-6 per step, growing
    # with training to <1e-3 relative over the first epoch's 14 steps.
    four, one = four_devices["loss"]
    assert len(four) == len(one) == 3
    for a, b in zip(four, one, strict=True):
        assert abs(a - b) <= 1e-3 * abs(b)
    assert four_devices["val"][0] == four_devices["val"][1]


def test_indivisible_global_batch_is_rejected(four_devices):
    assert four_devices["error"] == ("global batch 32 does not divide over 3 devices: use a multiple of 3 "
                                     "(or fewer devices)")


def test_checkpoint_from_four_devices_resumes_on_one(four_devices):
    assert four_devices["resumed_devices"] == 1
    resumed, whole = four_devices["resumed"]
    assert resumed[0] == whole[0]  # epoch 1 restored from the 4-device checkpoint, bit for bit
    assert abs(resumed[1] - whole[1]) <= 1e-3 * abs(whole[1])  # epoch 2 on 1 device vs 4: summation order
