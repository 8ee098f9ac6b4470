"""Comparative studies: several named configs trained one after another on the same data, each checkpointed
and resumable, summarized in one table, one overlay plot and one JSON. Used by ``experiments.improved``
(ablation) and ``experiments.cifar100_study``; the configs differ in structure (model, BatchNorm), so
they are separate programs rather than one vmapped sweep."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jaxcifar.data import Dataset
from jaxcifar.errors import TrainingError, warn
from jaxcifar.report import markdown_table, plot_overlay, selection_split, write_json, write_text
from jaxcifar.train import ResumeFrom, TrainConfig, fit
from jaxcifar.versions import environment

HEADER = ["variant", "best val acc", "best epoch", "test acc (best-val weights)", "test acc (last epoch)",
          "train s"]


def run_study(name: str, variants: Mapping[str, TrainConfig], data: Dataset, out: Path, *,
              resume: bool | ResumeFrom = True, progress: bool = True,
              bodies: Mapping[str, Callable[[], dict[str, Any]]] | None = None, intro: str = "",
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train every variant into ``out/checkpoints/<variant>`` and write ``results.json``, ``report.md`` and
    ``val_accuracy.png``. ``bodies[variant]()`` returns trained variables to fine-tune from. The JSON is
    rewritten after each variant, so an interrupted study keeps what it finished. A variant whose loss becomes
    NaN/inf is recorded with the error (``diverged_variants``) and the study goes on with the others."""
    bodies = bodies or {}
    results: dict[str, Any] = {}
    diverged: dict[str, Any] = {}
    header = {"experiment": name, "data": data.source, "train_size": len(data.train), "test_size": len(data.test),
              **(extra or {}), "environment": environment()}
    for variant, config in variants.items():
        body = bodies[variant]() if variant in bodies else None
        try:
            r = fit(config, data, checkpoint_dir=str(out / "checkpoints" / variant), resume=resume,
                    progress=progress, body=body)
        except TrainingError as e:
            warn(f"variant {variant!r}: {e}")
            diverged[variant] = {"config": config.to_dict(), "diverged": str(e)}
        else:
            results[variant] = {"config": config.to_dict(), "summary": r.summary, "history": r.history,
                                "train_seconds": float(sum(r.history["epoch_seconds"])),
                                "compile_seconds": r.meta["compile_seconds"], "fine_tuned": body is not None}
        write_json(out / "results.json", {**header, "variants": results, "diverged_variants": diverged})
    rows = [[v, x["summary"]["best_val_accuracy"], x["summary"]["best_epoch"], x["summary"]["test_accuracy"],
             x["summary"]["final_test_accuracy"], round(x["train_seconds"])] for v, x in results.items()]
    histories = {v: x["history"] for v, x in results.items()}
    if histories:
        plot_overlay(list(histories.values()), list(histories), out / "val_accuracy.png",
                     title=f"{name}: {selection_split(list(histories.values()))} accuracy")
    data_line = f"Data: {data.source}, {len(data.train)} training images, {len(data.test)} test."
    failed = f"**Diverged** (loss NaN/inf; see results.json): {', '.join(diverged)}." if diverged else ""
    paragraphs = [f"# {name}", intro, data_line, markdown_table(HEADER, rows), failed,
                  "![validation accuracy](val_accuracy.png)" if histories else ""]
    write_text(out / "report.md", "\n\n".join(filter(None, paragraphs)) + "\n")
    return results
