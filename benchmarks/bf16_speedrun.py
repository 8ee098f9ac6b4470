"""The speed preset in bfloat16 against float32, seed by seed: the evidence behind the batch-norm fix.

    python benchmarks/bf16_speedrun.py [--seeds 3] [--case tiny|small] [--out bf16_speedrun]

Trains ``configs.speedrun`` on generated data in both dtypes (the seeds as one sweep, so they share the
split of seed 0) and prints test accuracy per seed twice: as trained (the batch-norm running averages) and
with every batch-norm layer's statistics recomputed over the whole training split in one pass. The second
separates the trained weights from the running averages, which the recipe's fast momentum (0.6 per step)
makes noisy at small batches. Cases:

- ``tiny``: the original bf16 reproduction, 320 images, batch 32, 3 epochs (test accuracy scatters in both
  dtypes);
- ``small``: 1200 images, batch 64, 3 epochs, the case the CI test checks.

Writes ``bf16_speedrun.json`` and ``bf16_speedrun.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxcifar  # noqa: F401  (sets the XLA:CPU flags before JAX starts)
from jaxcifar import configs
from jaxcifar.data.stats import normalize
from jaxcifar.data.synthetic import synthetic_cifar
from jaxcifar.metrics import accuracy
from jaxcifar.report import write_json, write_text
from jaxcifar.train import FitResult, fit, prepare_data
from jaxcifar.versions import environment

CASES = {
    "tiny": dict(images=320, test=128, config=dict(epochs=3, batch_size=32, val_size=64, eval_batch_size=64,
                                                   log_every=4, unroll=2)),
    "small": dict(images=1200, test=256, config=dict(epochs=3, batch_size=64, val_size=0, eval_batch_size=256,
                                                     log_every=8)),
}


def recomputed_statistics(result: FitResult, run: int, images: jax.Array) -> dict[str, Any]:
    """Run ``run``'s variables with each batch-norm layer's statistics replaced by those of ``images`` (uint8,
    the training split) in one training-mode pass: a momentum of 0 keeps only that pass's statistics."""
    fns = result.fns
    state = jax.tree.map(lambda x: x[run], result.state) if result.run_axis else result.state
    x = normalize(images, fns.mean, fns.std, fns.compute_dtype)
    _, new = fns.model.clone(bn_momentum=0.0).apply(state.variables, x, train=True, mutable=["batch_stats"])
    return {"params": state.params, "batch_stats": new["batch_stats"]}


def test_accuracy(result: FitResult, variables: dict[str, Any], images: jax.Array, labels: jax.Array) -> float:
    """Test accuracy of ``variables`` with the recipe's test-time augmentation."""
    return float(accuracy(result.fns.probabilities(variables, images), labels))


def run_case(name: str, seeds: int) -> list[dict[str, Any]]:
    """One row per dtype: per-seed test accuracy as trained and with recomputed statistics."""
    case = CASES[name]
    data = synthetic_cifar(case["images"], case["test"], 10, seed=0, noise=60.0)
    config = configs.speedrun(**case["config"])
    train_images = prepare_data(data, config).train[0]
    test_images, test_labels = jnp.asarray(data.test.images), jnp.asarray(data.test.labels)
    rows = []
    for dtype in ("float32", "bfloat16"):
        result = fit(config.replace(dtype=dtype), data, runs=[{"seed": s} for s in range(seeds)], progress=False)
        recomputed = []
        for run in range(seeds):
            variables = recomputed_statistics(result, run, train_images)
            recomputed.append(test_accuracy(result, variables, test_images, test_labels))
        trained = [s["final_test_accuracy"] for s in result.summaries]
        rows.append({"case": name, "dtype": dtype, "trained": trained, "recomputed_statistics": recomputed})
        print(f"{name} {dtype}: trained {np.round(trained, 3)}, recomputed {np.round(recomputed, 3)}", flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table with the mean and sample standard deviation over seeds."""
    lines = ["| case | dtype | test accuracy per seed | mean ± std | recomputed statistics | mean ± std |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["case"], r["dtype"]]
        for key in ("trained", "recomputed_statistics"):
            values = np.asarray(r[key])
            spread = values.std(ddof=1) if len(values) > 1 else 0.0
            cells += [" / ".join(f"{v:.3f}" for v in values), f"{values.mean():.3f} ± {spread:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="default: both")
    parser.add_argument("--out", default="bf16_speedrun")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    rows = [row for name in args.case or sorted(CASES) for row in run_case(name, args.seeds)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    write_text(out / "bf16_speedrun.md", f"Backend: {jax.default_backend()}, seeds 0-{args.seeds - 1}.\n\n{table}")
    write_json(out / "bf16_speedrun.json", {"rows": rows, "seeds": args.seeds, "environment": environment()})
    print(table)


if __name__ == "__main__":
    main()
