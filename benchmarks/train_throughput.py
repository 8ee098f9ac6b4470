"""Training throughput (images/s after compile) and compile time per model, batch size and loop strategy,
on the current JAX backend, beside a PyTorch eager loop of the same ConvNet when torch is installed.

    python benchmarks/train_throughput.py [--models convnet resnet20] [--batches 32 128] [--steps 256]

Strategies: ``python`` (one jitted train_step per batch, looped from Python), ``unrolled`` (chunks of
16 steps fully unrolled in one program; the CPU default), ``scan`` (rolled ``lax.scan`` over a chunk;
the accelerator default, where a whole epoch is one scan). All use the library's own train_step on
on-device uint8 data with normalization inside, SGD momentum 0.9. Compare ratios within one run only:
shared machines are noisy.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxcifar  # noqa: F401  (sets the XLA:CPU flags before JAX starts)
from jaxcifar.data.synthetic import synthetic_cifar
from jaxcifar.train import TrainConfig, build, init_state, make_chunk_runner, prepare_data


def time_python_steps(fns, state, train: tuple, batch: int, steps: int) -> tuple[float, float]:
    """(seconds per jitted train step after compilation, compile seconds): one compiling step, then ``steps``
    timed ones, each on a random batch of the on-device ``train`` (images, labels), dispatched from Python."""
    images, labels = train
    step = jax.jit(lambda s, idx, k: fns.train_step(s, (images[idx], labels[idx]), k), donate_argnums=0)
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.integers(0, len(labels), batch)) for _ in range(steps + 1)]
    keys = jax.random.split(jax.random.key(0), steps + 1)
    t = time.perf_counter()
    state, m = step(state, batches[0], keys[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(1, steps + 1):
        state, m = step(state, batches[i], keys[i])
    jax.block_until_ready(m)
    return (time.perf_counter() - t) / steps, compile_s


def bench_jax(model: str, batch: int, loop: str, steps: int, chunk: int = 16) -> tuple[float, float]:
    cfg = TrainConfig(model=model, batch_size=batch, val_size=0,
                      model_kwargs={"hidden": (512, 512)} if model == "mlp" else {})
    data = prepare_data(synthetic_cifar(2048, 16), cfg)
    fns = build(cfg, data)
    state = init_state(cfg, fns)
    images, labels = data.train
    rng = np.random.default_rng(0)
    if loop == "python":
        seconds, compile_s = time_python_steps(fns, state, data.train, batch, steps - 1)
        return batch / seconds, compile_s
    run = jax.jit(make_chunk_runner(fns, unroll=True if loop == "unrolled" else 1), donate_argnums=0)
    n_chunks = max(2, steps // chunk)
    idx = jnp.asarray(rng.integers(0, 2048, (n_chunks, chunk, batch)))
    t = time.perf_counter()
    state, m = run(state, images, labels, idx[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for c in range(1, n_chunks):
        state, m = run(state, images, labels, idx[c])
    jax.block_until_ready(m)
    return (n_chunks - 1) * chunk * batch / (time.perf_counter() - t), compile_s


def bench_torch(batch: int, steps: int) -> float | None:
    """A straightforward PyTorch eager loop of the classic ConvNet, data already in memory."""
    try:
        import torch
        from torch import nn
    except ImportError:
        return None
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(1600, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x = torch.rand(2048, 3, 32, 32)
    y = torch.randint(0, 10, (2048,))
    loss_fn = nn.CrossEntropyLoss()

    def step(i):
        idx = torch.randint(0, 2048, (batch,))
        opt.zero_grad()
        loss = loss_fn(net(x[idx]), y[idx])
        loss.backward()
        opt.step()

    for i in range(5):
        step(i)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["convnet"])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    p.add_argument("--loops", nargs="+", default=["python", "unrolled", "scan"])
    p.add_argument("--steps", type=int, default=256)
    a = p.parse_args()
    print(f"backend {jax.default_backend()}, devices {jax.devices()}")
    print(f"{'model':10} {'batch':>5} {'loop':10} {'images/s':>9} {'compile s':>9}")
    for model in a.models:
        for batch in a.batches:
            for loop in a.loops:
                steps = a.steps if not (loop == "scan" and jax.default_backend() == "cpu") else 32
                ips, comp = bench_jax(model, batch, loop, steps)
                print(f"{model:10} {batch:5d} {loop:10} {ips:9.0f} {comp:9.1f}", flush=True)
            if model == "convnet":
                ips = bench_torch(batch, a.steps)
                print(f"{model:10} {batch:5d} {'torch':10} {ips or float('nan'):9.0f} {'-':>9}"
                      + ("" if ips else "  (torch not installed)"), flush=True)


if __name__ == "__main__":
    main()
