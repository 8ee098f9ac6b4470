"""K training runs in one compiled program vs K runs one after another: aggregate training images/s.

    python benchmarks/vmap_seeds.py [--ks 1 2 4 8 16] [--model convnet] [--batch 32] [--strategies vmap loop]

"sequential" is one run's throughput (K sequential runs take K times as long, so their aggregate
images/s equals one run's). "vmap" batches the K runs with ``jax.vmap``; "loop" traces them one after
another into one program (jaxcifar's CPU default). Memory is XLA's analysis of the compiled program
(arguments + outputs + temporaries) and the process's peak RSS. Compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxcifar  # noqa: F401  (sets the XLA:CPU flags before JAX starts)
from jaxcifar.data.synthetic import synthetic_cifar
from jaxcifar.train import TrainConfig, build, init_state, make_chunk_runner, prepare_data
from jaxcifar.train.runs import over_runs, program_bytes
from jaxcifar.train.state import stack_states


def bench(model: str, batch: int, k: int, strategy: str, steps_per_call: int, calls: int) -> tuple[float, float, int]:
    """(aggregate images/s, compile s, program bytes) for ``k`` runs (``strategy`` "single" for one run)."""
    cfg = TrainConfig(model=model, batch_size=batch, val_size=0)
    data = prepare_data(synthetic_cifar(4096, 16), cfg)
    fns = build(cfg, data)
    runner = make_chunk_runner(fns, unroll=True if jax.default_backend() == "cpu" else 1)
    rng = np.random.default_rng(0)
    if strategy == "single":
        state = init_state(cfg, fns)
        fn, shape = runner, (calls, steps_per_call, batch)
    else:
        state = stack_states([init_state(cfg, fns, {"seed": s}) for s in range(k)])
        fn, shape = over_runs(runner, (0, None, None, 0), strategy), (calls, k, steps_per_call, batch)
    index = jnp.asarray(rng.integers(0, 4096, shape), jnp.int32)
    t = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=0).lower(state, *data.train, index[0]).compile()
    state, m = compiled(state, *data.train, index[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for c in range(1, calls):
        state, m = compiled(state, *data.train, index[c])
    jax.block_until_ready(m)
    images = (calls - 1) * steps_per_call * batch * (1 if strategy == "single" else k)
    return images / (time.perf_counter() - t), compile_s, program_bytes(compiled)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="convnet")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--strategies", nargs="+", default=["vmap", "loop"])
    p.add_argument("--steps", type=int, default=16, help="straight-line train steps per compiled call (all runs)")
    p.add_argument("--calls", type=int, default=6)
    a = p.parse_args()
    print(f"backend {jax.default_backend()}, devices {jax.devices()}, model {a.model}, batch {a.batch}")
    seq, _, seq_bytes = bench(a.model, a.batch, 1, "single", a.steps, a.calls)
    print(f"sequential (one run): {seq:.0f} images/s, program {seq_bytes / 2**20:.0f} MiB", flush=True)
    print(f"{'K':>3} {'strategy':8} {'images/s':>9} {'vs seq':>7} {'compile s':>9} {'program MiB':>11} "
          f"{'peak RSS MiB':>12}")
    for k in a.ks:
        for strategy in a.strategies:
            per_call = max(1, a.steps // k) if strategy == "loop" else a.steps
            ips, comp, nbytes = bench(a.model, a.batch, k, strategy, per_call, a.calls)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"{k:3d} {strategy:8} {ips:9.0f} {ips / seq:6.2f}x {comp:9.1f} {nbytes / 2**20:11.0f} {rss:12.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
