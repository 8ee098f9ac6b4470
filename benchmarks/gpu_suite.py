"""Everything worth measuring on a GPU, in one command: Markdown table on stdout, JSON in --out.

    python benchmarks/gpu_suite.py --data ../shared/data/cifar10_jpeg.zip [--runs 5] [--out runs/gpu_suite]
    python benchmarks/gpu_suite.py --quick      # a CPU smoke version on generated data (tested in CI)

1. Both speed recipes (``configs.speedrun``: airbench94; ``configs.speedrun_muon``: airbench94_muon): test
   accuracy (TTA) and training time per run over ``--runs`` runs, compilation apart, in bfloat16 and float32,
   beside each reference's published figures (94.01 % in 3.83 s and in 2.59 s on an A100).
2. The classic ConvNet: seconds per epoch and images/s with the backend's default loop (``scan`` on GPU).
3. Seeds in one program: K = 1, 2, 4, 8, 16 seeds of the ConvNet vmapped, aggregate images/s against K
   sequential runs (K x the K = 1 time).

Backend defaults apply (scan and vmap on GPU); every row records the device and the jax version.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import jax
import numpy as np

import jaxcifar  # noqa: F401  (XLA flags before JAX starts)
from jaxcifar import configs
from jaxcifar.data import load_cifar
from jaxcifar.data.synthetic import synthetic_cifar
from jaxcifar.report import write_json, write_text
from jaxcifar.train import fit
from jaxcifar.versions import environment

REFERENCES = configs.SPEEDRUN_PUBLISHED  # on the original CIFAR-10, A100


def speedrun_rows(data, runs: int, quick: bool) -> list[dict]:
    """Time to accuracy of each speed recipe per compute dtype."""
    rows = []
    for (recipe, make), dtype in itertools.product(configs.SPEEDRUN_RECIPES.items(), ("bfloat16", "float32")):
        config = make(dtype=dtype)
        if quick:
            kwargs = {**config.model_kwargs, "widths": (16, 32, 32)}
            config = config.replace(epochs=1, batch_size=128, model_kwargs=kwargs)
        accs, secs, compile_s = [], [], []
        for seed in range(runs):
            r = fit(config.replace(seed=seed), data, progress=False)
            accs.append(r.summary["final_test_accuracy"])
            secs.append(float(np.sum(r.history["epoch_seconds"])))
            compile_s.append(r.meta["compile_seconds"])
        rows.append({"what": "speedrun", "recipe": recipe, "dtype": dtype, "runs": runs,
                     "test_accuracy_mean": float(np.mean(accs)),
                     "test_accuracy_std": float(np.std(accs, ddof=1)) if runs > 1 else None,
                     "train_seconds_mean": float(np.mean(secs)), "compile_seconds_first": compile_s[0],
                     "reference_accuracy": REFERENCES[recipe]["accuracy"],
                     "reference_a100_seconds": REFERENCES[recipe]["seconds"]})
    return rows


def convnet_rows(data) -> list[dict]:
    """Epoch time and images/s of the classic ConvNet (the second epoch: the first includes warm-up)."""
    rows = []
    for dtype in ("float32", "bfloat16"):
        config = configs.baseline(epochs=2, dtype=dtype, val_size=0, log_every=50)
        r = fit(config, data, progress=False)
        seconds = r.history["epoch_seconds"][-1]
        rows.append({"what": "convnet epoch", "dtype": dtype, "loop": r.meta["loop"], "epoch_seconds": seconds,
                     "images_per_second": r.meta["train_size"] / seconds})
    return rows


def seed_rows(data, ks: list[int]) -> list[dict]:
    """K seeds vmapped in one program against K sequential runs."""
    rows, single = [], None
    config = configs.baseline(epochs=2, val_size=0, log_every=50, run_strategy="vmap")
    for k in ks:
        r = fit(config, data, runs=[{"seed": s} for s in range(k)], progress=False)
        seconds = r.histories[0]["epoch_seconds"][-1]
        aggregate = k * r.meta["train_size"] / seconds
        single = single or aggregate
        rows.append({"what": "vmap seeds", "k": k, "runs_per_chunk": r.meta["runs_per_chunk"],
                     "aggregate_images_per_second": aggregate, "speedup_vs_sequential": aggregate / single})
    return rows


def markdown(rows: list[dict]) -> str:
    """One table per kind of row (``what``), columns in the rows' own order."""
    tables = []
    for what in dict.fromkeys(r["what"] for r in rows):
        group = [r for r in rows if r["what"] == what]
        keys = [k for k in group[0] if k != "what"]
        lines = [f"**{what}**", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in group:
            lines.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys)
                         + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="CIFAR-10 zip or ImageFolder (default: tfds; generated data with --quick)")
    p.add_argument("--runs", type=int, default=5, help="speed-preset runs per dtype")
    p.add_argument("--quick", action="store_true", help="tiny generated data, 1 run, K = 1, 2: a smoke test")
    p.add_argument("--out", default="runs/gpu_suite")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    data = synthetic_cifar(512, 128, 10, seed=0, noise=60.0) if args.quick else load_cifar("cifar10", args.data)
    runs = 1 if args.quick else args.runs
    rows = speedrun_rows(data, runs, args.quick) + convnet_rows(data)
    rows += seed_rows(data, [1, 2] if args.quick else [1, 2, 4, 8, 16])
    device = str(jax.devices()[0].device_kind)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "backend": jax.default_backend(), "quick": args.quick, "data": data.source,
              "rows": rows, "references": REFERENCES, "seconds": time.perf_counter() - t0,
              "environment": environment()}
    write_json(out / "gpu_suite.json", result)
    table = markdown(rows)
    write_text(out / "gpu_suite.md", f"# GPU suite on {device}\n\n{table}\n")
    print(f"device {device} ({jax.default_backend()}), data {data.source}")
    print(table)
    print(f"results in {out}")


if __name__ == "__main__":
    main()
