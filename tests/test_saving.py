"""Checkpoints saved in the background (``checkpoint.Saver``): the device trains on while Orbax writes, and
nothing about a checkpoint changes: its arrays and metadata are those of its epoch, its checksums are
written, and a resume from it (or from a process killed in the middle of a save) is exact."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import chex
import jax
import numpy as np
from conftest import interrupt_after, strip_times
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from jaxcifar.train import TrainConfig, build, checkpoint_manager, fit, init_state, prepare_data
from jaxcifar.train import checkpoint as ckpt

FAST = TrainConfig(epochs=3, batch_size=32, val_size=64, learning_rate=0.01, log_every=4, unroll=2,
                   eval_batch_size=64, augment=("flip",))


def test_background_save_holds_its_epoch_after_the_state_is_donated_and_the_history_grows(tiny, tmp_path,
                                                                                         monkeypatch):
    """The arrays are copied to the host before ``save`` returns (the next step may delete them), and the
    metadata is copied too: Orbax writes it later, from its own thread (slowed down here so that the
    history has grown by then)."""
    write = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def slow_write(self, x, directory):
        time.sleep(0.3)
        await write(self, x, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", slow_write)
    cfg = FAST.replace(model="mlp", model_kwargs={"hidden": (32,)})
    state = init_state(cfg, build(cfg, prepare_data(tiny, cfg)))
    expected = jax.tree.map(np.array, state.params)
    history = {"epoch": [1]}
    with ckpt.Saver(tmp_path / "ck", keep=2) as saver:
        saver.save(1, state, {"config": cfg.to_json_dict(), "histories": [history]}, {"val_accuracy": 0.5})
        jax.tree.map(lambda x: x.delete(), state)  # what donating the state to the next chunk does
        history["epoch"].append(2)  # the next epoch's figures
    manager = checkpoint_manager(tmp_path / "ck")
    assert ckpt.read_meta(manager, tmp_path / "ck", 1)["histories"] == [{"epoch": [1]}]
    fresh = init_state(cfg, build(cfg, prepare_data(tiny, cfg)))
    restored = ckpt.read_state(manager, tmp_path / "ck", 1, fresh)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, restored.params), expected)
    assert (tmp_path / "ck" / "1" / ckpt.CHECKSUMS).is_file()


def test_an_interrupted_fit_finishes_the_save_under_way(tiny, tmp_path):
    """The exception that stops training (here from the epoch hook, right after epoch 2's save started)
    leaves epoch 2's checkpoint complete, with its checksums."""
    interrupt_after(FAST, tiny, tmp_path / "ck", 2)
    assert checkpoint_manager(tmp_path / "ck").all_steps() == [1, 2]
    for step in (1, 2):
        assert (tmp_path / "ck" / str(step) / ckpt.CHECKSUMS).is_file()
        ckpt.verify(tmp_path / "ck", step)


KILLED_IN_A_SAVE = textwrap.dedent("""
    import os, sys
    import jaxcifar
    from jaxcifar.data.synthetic import synthetic_cifar
    from jaxcifar.train import TrainConfig, fit

    def kill(epoch, _):
        if epoch == 2:  # epoch 2's save has just started in the background: die without finishing it
            os._exit(3)

    config = TrainConfig.from_dict({config})
    fit(config, synthetic_cifar(512, 128, 10, seed=0, noise=60.0), checkpoint_dir=sys.argv[1], progress=False,
        on_epoch_end=kill)
""")


def test_a_process_killed_during_a_save_resumes_exactly(tiny, tmp_path):
    """``os._exit`` while epoch 2 is being written: whatever Orbax had finished by then (epoch 1 for sure,
    epoch 2 if its rename came first) is all a resume sees, and the resumed run equals an uninterrupted one."""
    script = KILLED_IN_A_SAVE.replace("{config}", repr(FAST.to_dict()))
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ck")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 3, out.stderr[-2000:]
    steps = checkpoint_manager(tmp_path / "ck").all_steps()
    assert steps in ([1], [1, 2]), steps
    resumed = fit(FAST, tiny, checkpoint_dir=str(tmp_path / "ck"), progress=False)
    full = fit(FAST, tiny, progress=False)
    assert strip_times(resumed.histories) == strip_times(full.histories)  # bit for bit on CPU
    chex.assert_trees_all_equal(resumed.state.params, full.state.params)
