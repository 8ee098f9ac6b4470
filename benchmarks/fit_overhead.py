"""Start-up cost of ``fit``: a tiny fit against a hand-written loop over the library's own ``train_step``.

    python benchmarks/fit_overhead.py [--images 2000] [--epochs 1] [--compile-cache DIR]

Both run in fresh processes (nothing compiled yet), on the same generated data and config (the classic
ConvNet, batch 32): ``fit`` (validation, test evaluation, checkpoint-free) and a plain Python loop that
jits ``StepFns.train_step``, initializes with ``init_state`` and evaluates the test split once. Prints each
wall time (process start to result, imports excluded), ``fit``'s own breakdown (startup = init +
compilation, epochs) and the ratio. With ``--compile-cache`` the ``fit`` process runs twice against a
persistent compilation cache, the second time warm.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import jaxcifar
import jax
from jaxcifar import configs
from jaxcifar.data.synthetic import synthetic_cifar
from jaxcifar.train import build, enable_compile_cache, fit, init_state, prepare_data
mode, images, epochs, cache = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if cache:
    enable_compile_cache(cache)
data = synthetic_cifar(images, 500, 10, seed=0, noise=60.0)
config = configs.baseline(epochs=epochs, val_size=200, log_every=50)
t0 = time.perf_counter()
if mode == "fit":
    result = fit(config, data, progress=False)
    out = {"test_accuracy": result.summary["test_accuracy"], "epochs_seconds": sum(result.history["epoch_seconds"]),
           "startup_seconds": result.meta["startup_seconds"], "compile_seconds": result.meta["compile_seconds"],
           "compilations": result.meta["compilations"], "chunk": result.meta["chunk"]}
else:
    prepared = prepare_data(data, config)
    fns = build(config, prepared)
    state = init_state(config, fns)
    step = jax.jit(fns.train_step, donate_argnums=0)
    images_, labels = prepared.train
    n = images_.shape[0] // config.batch_size
    for epoch in range(epochs):
        perm = jax.random.permutation(jax.random.key(epoch), images_.shape[0])
        for i in range(n):
            idx = perm[i * config.batch_size:(i + 1) * config.batch_size]
            state, m = step(state, (images_[idx], labels[idx]), jax.random.key(i))
    logits = jax.jit(fns.logits)(state.variables, prepared.test[0])
    out = {"test_accuracy": float((logits.argmax(-1) == prepared.test[1]).mean())}
out["wall_seconds"] = time.perf_counter() - t0
print(json.dumps(out))
"""


def child(mode: str, images: int, epochs: int, cache: str = "") -> dict:
    """Run one measurement in a fresh interpreter and return its JSON line."""
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(images), str(epochs), cache], capture_output=True,
                       text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="training images (200 of them held out)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--compile-cache", action="store_true", help="also time fit with a cold and a warm cache")
    args = p.parse_args()
    hand = child("hand", args.images, args.epochs)
    fitted = child("fit", args.images, args.epochs)
    rows = [("hand-written loop", hand), ("fit", fitted)]
    if args.compile_cache:
        with tempfile.TemporaryDirectory() as cache:
            rows.append(("fit, persistent cache cold", child("fit", args.images, args.epochs, cache)))
            rows.append(("fit, persistent cache warm", child("fit", args.images, args.epochs, cache)))
    print(f"tiny fit: {args.images} images ({args.images - 200} trained), {args.epochs} epoch(s), classic ConvNet")
    print("| | wall s | startup s | compile s | compilations | epochs s | test acc |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        cells = [f"{r['wall_seconds']:.1f}"] + [
            f"{r[k]:.1f}" if isinstance(r.get(k), float) else str(r.get(k, "-"))
            for k in ("startup_seconds", "compile_seconds", "compilations", "epochs_seconds")]
        print(f"| {name} | " + " | ".join(cells) + f" | {r['test_accuracy']:.3f} |")
    print(f"fit / hand-written: {fitted['wall_seconds'] / hand['wall_seconds']:.2f}x")


if __name__ == "__main__":
    main()
