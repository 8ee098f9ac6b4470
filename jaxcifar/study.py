"""Comparative studies: several named configs trained one after another on the same data, each checkpointed
and resumable, summarized in one table, one overlay plot and one JSON. Used by ``experiments.improved``
(ablation) and ``experiments.cifar100_study``; the configs differ in structure (model, BatchNorm), so
they are separate programs rather than one vmapped sweep, but each variant's seeds train in one program. With
several seeds the variants are compared with a reference variant, paired by seed (``jaxcifar.compare``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jaxcifar.compare import SCORE_METRICS, compare_scores, score_matrix, verdict
from jaxcifar.data import Dataset
from jaxcifar.errors import TrainingError, warn
from jaxcifar.report import (
    comparison_tables,
    markdown_table,
    plot_forest,
    plot_overlay,
    selection_split,
    write_json,
    write_text,
)
from jaxcifar.train import ResumeFrom, TrainConfig, fit
from jaxcifar.versions import environment

HEADER = ["variant", "seed", "best val acc", "best epoch", "test acc (best-val weights)", "test acc (last epoch)",
          "train s"]
METRIC = "test_accuracy"  # of the best-validation weights


def run_study(name: str, variants: Mapping[str, TrainConfig], data: Dataset, out: Path, *,
              resume: bool | ResumeFrom = True, progress: bool = True,
              bodies: Mapping[str, Callable[[], dict[str, Any]]] | None = None, intro: str = "",
              extra: Mapping[str, Any] | None = None, seeds: int = 1, reference: str | None = None
              ) -> dict[str, Any]:
    """Train every variant into ``out/checkpoints/<variant>`` and write ``results.json``, ``report.md``,
    ``val_accuracy.png`` and (``seeds`` > 1) ``forest.png``. Each variant trains ``seeds`` seeds (its config's
    seed, seed+1, ...) in one program; the variants are then compared with ``reference`` (default: the best)
    over shared seeds. ``bodies[variant]()`` returns trained variables to fine-tune from. The JSON is rewritten
    after each variant, so an interrupted study keeps what it finished. A variant whose loss becomes NaN/inf
    is recorded with the error (``diverged_variants``) and the study goes on with the others."""
    bodies = bodies or {}
    results: dict[str, Any] = {}
    diverged: dict[str, Any] = {}
    header = {"experiment": name, "data": data.source, "train_size": len(data.train), "test_size": len(data.test),
              "seeds": seeds, **(extra or {}), "environment": environment()}
    for variant, config in variants.items():
        body = bodies[variant]() if variant in bodies else None
        runs = [{"seed": config.seed + s} for s in range(seeds)] if seeds > 1 else None
        try:
            r = fit(config, data, runs=runs, checkpoint_dir=str(out / "checkpoints" / variant), resume=resume,
                    progress=progress, body=body)
        except TrainingError as e:
            warn(f"variant {variant!r}: {e}")
            diverged[variant] = {"config": config.to_dict(), "diverged": str(e)}
        else:
            results[variant] = {"config": config.to_dict(), "seeds": [config.seed + s for s in range(seeds)],
                                "summary": r.summary, "history": r.history, "summaries": r.summaries,
                                "histories": r.histories, "train_seconds": float(sum(r.history["epoch_seconds"])),
                                "compile_seconds": r.meta["compile_seconds"], "fine_tuned": body is not None}
        write_json(out / "results.json", {**header, "variants": results, "diverged_variants": diverged})
    comparison = _compare(results, reference, len(data.test))
    if comparison:
        plot_forest(comparison, out / "forest.png", METRIC, title=f"{name}: {seeds} seeds per variant")
        write_json(out / "results.json", {**header, "variants": results, "diverged_variants": diverged,
                                          "compared_on": METRIC, "comparison": comparison,
                                          "scores": _scores(results)})
    _write_report(name, intro, data, out, results, diverged, comparison)
    return results


def _compare(results: Mapping[str, Any], reference: str | None, n_test: int) -> dict[str, Any] | None:
    """The variants compared over seeds, or None with one seed each or fewer than two variants."""
    if len(results) < 2 or min(len(x["summaries"]) for x in results.values()) < 2:
        return None
    scores = {v: dict(zip(x["seeds"], (s[METRIC] for s in x["summaries"]), strict=True)) for v, x in results.items()}
    return compare_scores(scores, n_test=n_test, reference=reference if reference in scores else None)


def _scores(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every run's figures as records (variant, seed, metrics) for pandas or rliable."""
    return [row for v, x in results.items()
            for row in score_matrix([{"seed": s} for s in x["seeds"]], x["summaries"], lambda _, v=v: v,
                                    SCORE_METRICS)]


def _write_report(name: str, intro: str, data: Dataset, out: Path, results: Mapping[str, Any],
                  diverged: Mapping[str, Any], comparison: Mapping[str, Any] | None) -> None:
    """report.md: every run's figures, the comparison over seeds when there is one, and the overlay plot."""
    rows = [[v, seed, s["best_val_accuracy"], s["best_epoch"], s["test_accuracy"], s["final_test_accuracy"],
             round(x["train_seconds"])] for v, x in results.items()
            for seed, s in zip(x["seeds"], x["summaries"], strict=True)]
    histories = {v: x["history"] for v, x in results.items()}
    if histories:
        plot_overlay(list(histories.values()), list(histories), out / "val_accuracy.png",
                     title=f"{name}: {selection_split(list(histories.values()))} accuracy (first seed)")
    data_line = f"Data: {data.source}, {len(data.train)} training images, {len(data.test)} test."
    failed = f"**Diverged** (loss NaN/inf; see results.json): {', '.join(diverged)}." if diverged else ""
    compared = ["## Comparison over seeds (test accuracy of the best-validation weights, paired by seed)",
                comparison_tables(comparison, "variant"), f"**{verdict(comparison)}**",
                "![forest plot](forest.png)"] if comparison else [
        "One seed per variant: differences between variants are not tested (train with several seeds)."
        if len(results) > 1 else ""]
    paragraphs = [f"# {name}", intro, data_line, markdown_table(HEADER, rows), failed, *compared,
                  "![validation accuracy](val_accuracy.png)" if histories else ""]
    write_text(out / "report.md", "\n\n".join(filter(None, paragraphs)) + "\n")
