"""The run plan: every decision fit takes from the config, the run count and the machine, tested without
compiling anything (a stand-in mesh plays several devices)."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from jaxcifar.errors import ConfigError
from jaxcifar.train import TrainConfig, build, init_state, make_chunk_runner, prepare_data
from jaxcifar.train.plan import STEPS_PER_UNROLLED_STEP, halving_group_size, make_plan

LONG = TrainConfig(epochs=20, batch_size=32, unroll=16)  # 20 x 1000 steps: long enough for full chunks


def devices(n: int) -> SimpleNamespace:
    """A stand-in for an n-device mesh: planning reads only its size."""
    return SimpleNamespace(size=n)


def test_cpu_defaults_single_run():
    plan = make_plan(LONG, 1, False, 32_000, devices(1), backend="cpu")
    assert (plan.strategy, plan.loop, plan.parallel, plan.group_size) == ("single", "unrolled", "data", 1)
    assert plan.steps_per_epoch == 1000 and plan.chunk(1) == 16
    assert plan.bounds(1)[0] == (0, 16) and plan.bounds(1)[-1] == (992, 1000)  # a shorter last chunk
    assert not plan.run_axis and plan.data_mesh is None and plan.run_mesh is None


def test_gpu_defaults_scan_the_epoch_and_vmap_the_runs():
    plan = make_plan(LONG, 8, True, 32_000, devices(1), backend="gpu")
    assert (plan.strategy, plan.loop) == ("vmap", "scan")
    assert plan.chunk(8) == plan.steps_per_epoch and plan.bounds(8) == ((0, 1000),)
    assert plan.group_size is None  # memory decides


def test_loop_strategy_keeps_the_program_size():
    plan = make_plan(LONG, 4, True, 32_000, devices(1), backend="cpu")
    assert plan.strategy == "loop" and plan.chunk(4) == 4 and plan.chunk(3) == 5 and plan.chunk(32) == 1


@pytest.mark.parametrize("epochs,steps,chunk", [
    (1, 31, 1),  # the tiny fit: a one-step chunk compiles in a second, a 16-step one in ~7 s
    (3, 140, 6),  # the --quick budget
    (1, 1000, 15),
    (20, 1531, 16),  # the full dropout sweep: config.unroll
])
def test_short_runs_get_short_chunks(epochs, steps, chunk):
    plan = make_plan(LONG.replace(epochs=epochs), 1, False, steps * 32, devices(1), backend="cpu")
    assert plan.chunk(1) == chunk == max(1, min(16, epochs * steps // STEPS_PER_UNROLLED_STEP))


def test_a_chunk_never_exceeds_the_epoch():
    plan = make_plan(LONG.replace(epochs=1000), 1, False, 5 * 32, devices(1), backend="cpu")
    assert plan.chunk(1) == 5 and plan.bounds(1) == ((0, 5),)


def test_explicit_choices_win():
    cfg = LONG.replace(loop="scan", run_strategy="vmap", runs_per_chunk=3)
    plan = make_plan(cfg, 7, True, 32_000, devices(1), backend="cpu")
    assert (plan.strategy, plan.loop, plan.group_size) == ("vmap", "scan", 3)
    assert [list(g) for g in plan.groups(3)] == [[0, 1, 2], [3, 4, 5], [6]]


def test_parallel_modes_over_several_devices():
    vmap = LONG.replace(run_strategy="vmap")
    runs = make_plan(vmap, 8, True, 32_000, devices(4), backend="cpu")
    assert runs.parallel == "runs" and runs.group_size == 8  # the run axis is sharded: all runs in one group
    odd = make_plan(vmap, 6, True, 32_000, devices(4), backend="cpu")
    assert odd.parallel == "data" and odd.group_size is None  # 6 runs do not divide over 4 devices
    single = make_plan(LONG, 1, False, 32_000, devices(4), backend="cpu")
    assert single.parallel == "data"
    with pytest.raises(ConfigError, match="does not divide over 4 devices"):
        make_plan(LONG.replace(batch_size=30), 1, False, 32_000, devices(4), backend="cpu")
    with pytest.raises(ConfigError, match="parallel='runs' shards a vmapped sweep"):
        make_plan(LONG.replace(parallel="runs"), 4, True, 32_000, devices(4), backend="cpu")


def test_halving_group_size():
    assert halving_group_size(10, lambda n: n <= 3) == 3  # 10 -> 5 -> 3
    assert halving_group_size(10, lambda n: True) == 10
    assert halving_group_size(10, lambda n: False) == 1


def test_chunk_length_changes_no_number(tiny):
    """The plan may shorten chunks because the chunk length only changes dispatch: 4 steps as 4 chunks of 1,
    2 of 2 or 1 of 4 give bit-identical parameters on CPU."""
    cfg = TrainConfig(batch_size=32, val_size=0, augment=("flip", "crop"), dropout_rate=0.3)
    data = prepare_data(tiny, cfg)
    fns = build(cfg, data)
    index = jax.random.randint(jax.random.key(0), (4, 32), 0, data.train_size)
    finals = []
    for k in (1, 2, 4):
        run = jax.jit(make_chunk_runner(fns, unroll=True))
        state = init_state(cfg, fns)
        for lo in range(0, 4, k):
            state, _ = run(state, *data.train, index[lo:lo + k])
        finals.append([np.asarray(x) for x in jax.tree.leaves(state.params)])
    for other in finals[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(finals[0], other, strict=True))
