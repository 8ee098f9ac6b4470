"""Where a speed recipe's training time goes: milliseconds per training image of one jitted train step for
each speed recipe at its own batch and at the other's, and the optimizer update alone (Muon against SGD).

    python benchmarks/speedrun_step_cost.py [--steps 4]

Explains a side-by-side time: the Muon recipe does 0.8x airbench94's epochs, but on XLA:CPU its step can
cost more per image (its batch is 2000, not 1024) and Muon adds Newton-Schulz iterations. Uses the
library's own train_step on generated data (the cost does not depend on the pixels). Compare ratios within
one run only: shared machines are noisy.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from train_throughput import time_python_steps  # this directory is on sys.path when run as a script

import jaxcifar  # noqa: F401  (sets the XLA:CPU flags before JAX starts)
from jaxcifar import configs
from jaxcifar.data.synthetic import synthetic_cifar
from jaxcifar.train import TrainConfig, build, init_state, make_optimizer, prepare_data

POOL = 4096  # generated training images the batches are drawn from


def step_ms_per_image(config: TrainConfig, steps: int) -> tuple[float, float]:
    """(ms per image of a train step after compilation, compile seconds)."""
    data = prepare_data(synthetic_cifar(POOL, 16), config)
    fns = build(config, data)
    state = init_state(config, fns, None, data.train[0])
    seconds, compile_s = time_python_steps(fns, state, data.train, config.batch_size, steps)
    return 1e3 * seconds / config.batch_size, compile_s


def update_ms(config: TrainConfig, repeats: int = 10) -> float:
    """Milliseconds of one optimizer update on the speed net's parameters (no forward or backward pass)."""
    small = config.replace(batch_size=64)  # the parameters do not depend on the batch
    data = prepare_data(synthetic_cifar(64, 16), small)
    fns = build(small, data)
    params = init_state(small, fns, None, data.train[0]).params
    tx = make_optimizer(config, 25)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p))
    opt_state = tx.init(params)
    jax.block_until_ready(update(grads, opt_state, params))
    t = time.perf_counter()
    for _ in range(repeats):
        out = update(grads, opt_state, params)
    jax.block_until_ready(out)
    return 1e3 * (time.perf_counter() - t) / repeats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps per row (after one compiling step)")
    args = p.parse_args(argv)
    muon = configs.speedrun_muon()
    rows = {
        "airbench94, batch 1024": configs.speedrun(),
        "airbench94, batch 2000": configs.speedrun(batch_size=2000),
        "muon, batch 2000": muon,
        "muon recipe with SGD for all, batch 2000": muon.replace(optimizer="sgd"),
        "muon, batch 1024": muon.replace(batch_size=1024),
    }
    print(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print("| step | ms per image | compile s |\n|---|---|---|")
    for name, config in rows.items():
        ms, compile_s = step_ms_per_image(config, args.steps)
        print(f"| {name} | {ms:.3f} | {compile_s:.1f} |", flush=True)
    print("\n| optimizer update alone | ms |\n|---|---|")
    for name, config in (("Muon (recipe)", muon), ("SGD for all", muon.replace(optimizer="sgd"))):
        print(f"| {name} | {update_ms(config):.1f} |", flush=True)


if __name__ == "__main__":
    main()
