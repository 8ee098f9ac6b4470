"""Everything worth measuring on a GPU, in one command: Markdown tables on stdout, JSON in --out.

    python benchmarks/gpu_suite.py --data ../shared/data/cifar10_jpeg.zip [--runs 5] [--out runs/gpu_suite]
    python benchmarks/gpu_suite.py --quick      # a CPU smoke version on generated data (tested in CI)
    python benchmarks/gpu_suite.py --sections checkpoint bf16 ...   # some sections only

Sections (all by default, in this order):

1. ``speedrun``: both speed recipes (``configs.speedrun``: airbench94; ``configs.speedrun_muon``:
   airbench94_muon): test accuracy (TTA) and training time per run over ``--runs`` runs, compilation apart,
   in bfloat16 and float32, beside each reference's published figures (94.01 % in 3.83 s and in 2.59 s on an
   A100).
2. ``convnet``: the classic ConvNet's seconds per epoch and images/s with the backend's default loop
   (``scan`` on GPU), in both dtypes.
3. ``seeds``: K = 1, 2, 4, 8, 16 seeds of the ConvNet vmapped in one program, aggregate images/s against K
   sequential runs (K x the K = 1 time).
4. ``bf16``: the batch-norm models (improved ConvNet, ResNet-20, the speed preset) trained in bfloat16 and
   float32 on 10000 images for 5 epochs, 2 seeds: test accuracy per seed and the paired difference
   (``bf16_accuracy.py``, which runs the same rows alone).
5. ``checkpoint``: what a checkpoint costs the device: the seconds ``fit`` blocks on a background save (the
   copy to the host) against a synchronous save of the same state, for three model sizes.
6. ``deterministic``: the ``convnet`` section again in a fresh process with ``--deterministic``
   (``--xla_gpu_deterministic_ops=true``, which must be set before JAX starts): its cost in epoch time.

Backend defaults apply (scan and vmap on GPU); every row records the device and the jax version.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from bf16_accuracy import model_rows  # this directory is on sys.path when run as a script

import jaxcifar  # noqa: F401  (XLA flags before JAX starts)
from jaxcifar import configs
from jaxcifar._xla import deterministic_gpu
from jaxcifar.data import Dataset, load_cifar
from jaxcifar.data.synthetic import synthetic_cifar
from jaxcifar.report import write_json, write_text
from jaxcifar.train import build, fit, init_state, prepare_data
from jaxcifar.train.checkpoint import Saver
from jaxcifar.versions import environment

REFERENCES = configs.SPEEDRUN_PUBLISHED  # on the original CIFAR-10, A100
# --quick trains the speed preset narrow, at a batch the 512 generated images hold, in every section
QUICK_SPEEDRUN = {"batch_size": 128, "model_kwargs": {"widths": (16, 32, 32)}}


def speedrun_rows(data: Dataset, args: argparse.Namespace) -> list[dict]:
    """Time to accuracy of each speed recipe per compute dtype."""
    rows = []
    for (recipe, make), dtype in itertools.product(configs.SPEEDRUN_RECIPES.items(), ("bfloat16", "float32")):
        config = make(dtype=dtype)
        if args.quick:  # Muon's config has model_kwargs of its own: keep them
            kwargs = {**config.model_kwargs, **QUICK_SPEEDRUN["model_kwargs"]}
            config = config.replace(epochs=1, batch_size=QUICK_SPEEDRUN["batch_size"], model_kwargs=kwargs)
        accs, secs, compile_s = [], [], []
        for seed in range(args.runs):
            r = fit(config.replace(seed=seed), data, progress=False)
            accs.append(r.summary["final_test_accuracy"])
            secs.append(float(np.sum(r.history["epoch_seconds"])))
            compile_s.append(r.meta["compile_seconds"])
        rows.append({"what": "speedrun", "recipe": recipe, "dtype": dtype, "runs": args.runs,
                     "test_accuracy_mean": float(np.mean(accs)),
                     "test_accuracy_std": float(np.std(accs, ddof=1)) if args.runs > 1 else None,
                     "train_seconds_mean": float(np.mean(secs)), "compile_seconds_first": compile_s[0],
                     "reference_accuracy": REFERENCES[recipe]["accuracy"],
                     "reference_a100_seconds": REFERENCES[recipe]["seconds"]})
    return rows


def convnet_rows(data: Dataset, args: argparse.Namespace) -> list[dict]:
    """Epoch time and images/s of the classic ConvNet (the second epoch: the first includes warm-up)."""
    rows = []
    for dtype in ("float32", "bfloat16"):
        config = configs.baseline(epochs=2, dtype=dtype, val_size=0, log_every=50)
        r = fit(config, data, progress=False)
        seconds = r.history["epoch_seconds"][-1]
        rows.append({"what": "convnet epoch", "dtype": dtype, "loop": r.meta["loop"], "epoch_seconds": seconds,
                     "images_per_second": r.meta["train_size"] / seconds})
    return rows


def seed_rows(data: Dataset, args: argparse.Namespace) -> list[dict]:
    """K seeds vmapped in one program against K sequential runs."""
    rows, single = [], None
    config = configs.baseline(epochs=2, val_size=0, log_every=50, run_strategy="vmap")
    for k in [1, 2] if args.quick else [1, 2, 4, 8, 16]:
        r = fit(config, data, runs=[{"seed": s} for s in range(k)], progress=False)
        seconds = r.histories[0]["epoch_seconds"][-1]
        aggregate = k * r.meta["train_size"] / seconds
        single = single or aggregate
        rows.append({"what": "vmap seeds", "k": k, "runs_per_chunk": r.meta["runs_per_chunk"],
                     "aggregate_images_per_second": aggregate, "speedup_vs_sequential": aggregate / single})
    return rows


def bf16_rows(data: Dataset, args: argparse.Namespace) -> list[dict]:
    """The batch-norm models in bfloat16 against float32 (on the quick data: the narrow speed preset for one
    epoch)."""
    if args.quick:
        return model_rows(data, ["speedrun"], epochs=1, seeds=1, overrides=QUICK_SPEEDRUN, log=_log)
    subset = data.subset(10000, 10000, seed=0)
    return model_rows(subset, ["improved", "resnet20", "speedrun"], epochs=5, seeds=2, log=_log)


def checkpoint_rows(data: Dataset, args: argparse.Namespace) -> list[dict]:
    """Seconds ``fit`` blocks per checkpoint (median of 5 saves): a background save (what ``fit`` does)
    against a synchronous one, for the speed preset's, the improved ConvNet's and ResNet-18's whole training
    state (parameters, optimizer state, statistics)."""
    recipes = {"speedrun": configs.speedrun(), "improved": configs.improved(),
               "resnet18": configs.improved(model="resnet18", model_kwargs={}, dropout_rate=0.0)}
    if args.quick:
        recipes = {"speedrun": configs.speedrun(**QUICK_SPEEDRUN)}
    rows = []
    for name, config in recipes.items():
        prepared = prepare_data(data, config)
        state = init_state(config, build(config, prepared), train_images=prepared.train[0])
        background, synchronous = save_seconds(state)
        megabytes = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
        rows.append({"what": "checkpoint", "model": name, "state_mb": megabytes,
                     "background_blocking_seconds": background, "synchronous_seconds": synchronous})
    return rows


def save_seconds(state: Any, saves: int = 5) -> tuple[float, float]:
    """Median seconds a save of ``state`` blocks the caller: in the background (what ``fit`` does), then
    synchronously (the call waits for the whole write)."""
    background, synchronous = [], []
    with tempfile.TemporaryDirectory() as directory, Saver(directory, keep=2) as saver:
        for step in range(1, 2 * saves + 1):
            t0 = time.perf_counter()
            saver.save(step, state, {}, {"train_accuracy": 0.0})
            if step > saves:
                saver.finish()
                synchronous.append(time.perf_counter() - t0)
            else:
                background.append(time.perf_counter() - t0)
                saver.finish()  # untimed: the device would be training meanwhile
    return statistics.median(background), statistics.median(synchronous)


def deterministic_rows(data: Dataset, args: argparse.Namespace) -> list[dict]:
    """The ``convnet`` section in a fresh process with ``--deterministic`` (the flag must precede JAX's
    start), its rows relabelled."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, __file__, "--sections", "convnet", "--deterministic", "--out", out]
        command += ["--quick"] if args.quick else ["--data", args.data] if args.data else []
        subprocess.run(command, check=True)
        rows = json.loads((Path(out) / "gpu_suite.json").read_text())["rows"]
    return [{**r, "what": "convnet epoch, deterministic ops"} for r in rows]


SECTIONS: dict[str, Callable[[Dataset, argparse.Namespace], list[dict]]] = {
    "speedrun": speedrun_rows, "convnet": convnet_rows, "seeds": seed_rows, "bf16": bf16_rows,
    "checkpoint": checkpoint_rows, "deterministic": deterministic_rows}


def _log(line: str) -> None:
    print(f"gpu_suite: {line}", flush=True)


def markdown(rows: list[dict]) -> str:
    """One table per kind of row (``what``), columns in the rows' own order."""
    tables = []
    for what in dict.fromkeys(r["what"] for r in rows):
        group = [r for r in rows if r["what"] == what]
        keys = [k for k in group[0] if k != "what"]
        lines = [f"**{what}**", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in group:
            lines.append("| " + " | ".join(_cell(r[k]) for k in keys) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def _cell(value: Any) -> str:
    """A table cell: floats to 4 significant digits, lists of floats joined with " / "."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return " / ".join(_cell(v) for v in value)
    return str(value)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="CIFAR-10 zip or ImageFolder (default: tfds; generated data with --quick)")
    p.add_argument("--runs", type=int, default=5, help="speed-preset runs per recipe and dtype")
    p.add_argument("--quick", action="store_true", help="tiny generated data, 1 run, K = 1, 2: a smoke test")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    p.add_argument("--deterministic", action="store_true", help="--xla_gpu_deterministic_ops=true")
    p.add_argument("--out", default="runs/gpu_suite")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.deterministic:
        deterministic_gpu()
    args.runs = 1 if args.quick else args.runs
    t0 = time.perf_counter()
    data = synthetic_cifar(512, 128, 10, seed=0, noise=60.0) if args.quick else load_cifar("cifar10", args.data)
    rows = []
    for name in args.sections:
        _log(f"section {name} ({time.perf_counter() - t0:.0f} s so far)")
        rows += SECTIONS[name](data, args)
    device = str(jax.devices()[0].device_kind)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "backend": jax.default_backend(), "quick": args.quick, "data": data.source,
              "deterministic": args.deterministic, "sections": args.sections, "rows": rows,
              "references": REFERENCES, "seconds": time.perf_counter() - t0, "environment": environment()}
    write_json(out / "gpu_suite.json", result)
    table = markdown(rows)
    write_text(out / "gpu_suite.md", f"# GPU suite on {device}\n\n{table}\n")
    print(f"device {device} ({jax.default_backend()}), data {data.source}")
    print(table)
    print(f"results in {out}")


if __name__ == "__main__":
    main()
