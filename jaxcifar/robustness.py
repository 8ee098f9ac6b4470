"""Robustness of K models trained together (``fit(runs=...)``, one per seed): what the seeds agree on, how
well calibrated they are, what their ensemble gains and how they hold up under common corruptions.

The K models are evaluated together in one compiled program (vmapped over their weights where they trained
vmapped, one after another inside the program otherwise, as the training's run strategy chose), and the
metrics of all K in another (:func:`jaxcifar.metrics.seed_metrics`). Used by ``experiments.robustness``;
research code calls :func:`evaluate_robustness` on its own ``fit`` result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxcifar.data import Split
from jaxcifar.data.corruptions import SEVERITIES, corrupt, corruption_key, corruption_names
from jaxcifar.data.sources import load_tfds_corrupted
from jaxcifar.errors import ConfigError
from jaxcifar.metrics import ECE_BINS, seed_metrics
from jaxcifar.report import seed_statistics
from jaxcifar.train import FitResult, StepFns

Predictor = Callable[[np.ndarray], np.ndarray]


def seed_predictor(fns: StepFns, variables: Any, vmap_runs: bool, batch_size: int = 1000) -> Predictor:
    """``predict(images uint8 [N, 32, 32, 3]) -> probabilities float32 [K, N, C]`` of the K models whose
    ``variables`` are stacked on a leading run axis, in one compiled program per batch shape; the last batch
    is padded to ``batch_size`` so every batch reuses it. ``vmap_runs``: batch the K models (fast on a GPU),
    else run them one after another inside the program (fast on a CPU, where vmapped convolutions are slow)."""
    if vmap_runs:
        program = jax.jit(jax.vmap(fns.probabilities, in_axes=(0, None)))
    else:
        program = jax.jit(lambda vs, images: jax.lax.map(lambda v: fns.probabilities(v, images), vs))

    def predict(images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            n = len(batch)
            padded = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)])
            out.append(np.asarray(program(variables, padded))[:, :n])
        return np.concatenate(out, axis=1)

    return predict


def _plain(x: Any) -> Any:
    """An array as (nested) lists of floats, NaN as None (JSON has no NaN)."""
    a = np.asarray(x, np.float64)
    if a.ndim > 0:
        return [_plain(v) for v in a]
    return None if np.isnan(a) else a.item()


def _jsonable(tree: Any) -> Any:
    return jax.tree.map(_plain, tree)


def _predictor_of(result: FitResult, weights: str, batch_size: int) -> Predictor:
    variables = result.state.weights(weights)
    if not result.run_axis:  # one run: give it the run axis the predictor expects
        variables = jax.tree.map(lambda x: x[None], variables)
    return seed_predictor(result.fns, variables, result.meta.get("run_strategy") == "vmap", batch_size)


def clean_metrics(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """:func:`~jaxcifar.metrics.seed_metrics` of K models' probabilities [K, N, C] on the uncorrupted test split
    (``labels`` [N]), as JSON-ready lists (NaN as None), with the mean single-model accuracy and the ensemble's
    gain over it."""
    metrics = _jsonable(jax.jit(seed_metrics, static_argnums=2)(jnp.asarray(probs), jnp.asarray(labels), bins))
    mean_single = float(np.mean(metrics["accuracy"]))
    k = len(metrics["accuracy"])
    off_diagonal = np.asarray(metrics["disagreement"])[~np.eye(k, dtype=bool)]
    metrics["summary"] = {
        "mean_single_accuracy": mean_single,
        "ensemble_accuracy": metrics["ensemble"]["accuracy"],
        "ensemble_gain": metrics["ensemble"]["accuracy"] - mean_single,
        "mean_disagreement": float(off_diagonal.mean()) if k > 1 else 0.0,
        **{name: seed_statistics(metrics[name]) for name in ("accuracy", "ece", "nll", "brier")},
    }
    return metrics


def variants(runs: Sequence[Mapping[str, Any]]) -> list[tuple[dict[str, Any], list[int]]]:
    """The runs grouped by their swept hyper-parameters (every run key but ``seed``), in order of first
    appearance: ``[(variant, run indices)]``. Seeds of one variant are samples of one recipe; runs of two
    variants are not, so ensembles and seed statistics are taken within a variant, never across."""
    groups: dict[str, tuple[dict[str, Any], list[int]]] = {}
    for i, run in enumerate(runs):
        variant = {k: v for k, v in run.items() if k != "seed"}
        groups.setdefault(repr(sorted(variant.items())), (variant, []))[1].append(i)
    return list(groups.values())


CorruptedSet = Callable[[str, int], Split]


def generated_corruptions(test: Split, key: jax.Array) -> CorruptedSet:
    """``(name, severity) -> Split``: ``test`` corrupted on the device (:func:`~jaxcifar.data.corruptions.corrupt`);
    each cell has its own key (:func:`~jaxcifar.data.corruptions.corruption_key`), so the same key gives the same
    images."""
    def corrupted(name: str, severity: int) -> Split:
        return Split(corrupt(test.images, name, severity, corruption_key(key, name, severity)), test.labels)

    return corrupted


def tfds_corruptions(data_dir: str | None = None) -> CorruptedSet:
    """``(name, severity) -> Split``: the published CIFAR-10-C images from tfds (needs the internet or a prepared
    ``data_dir``; see :func:`~jaxcifar.data.sources.load_tfds_corrupted`)."""
    corrupted = functools.partial(load_tfds_corrupted, data_dir=data_dir)
    corrupted.source = "the published CIFAR-10-C images (tfds cifar10_corrupted)"  # what the report names
    return corrupted


def corruption_accuracy(predict: Predictor, corrupted: CorruptedSet, names: Sequence[str],
                        severities: Sequence[int], groups: Sequence[list[int]],
                        progress: bool = True) -> list[dict[str, Any]]:
    """Accuracy of each model and of their ensemble on every ``corrupted(name, severity)`` set, for each group
    of models in ``groups`` (lists of model indices, e.g. the variants): ``[{"cells": {name: {severity:
    {"accuracy": [k], "ensemble_accuracy": a}}}, "mean_accuracy": [k] (each model's mean over all cells),
    "statistics": mean +- std of that over models}]``. Each set is corrupted and predicted once for all groups."""
    todo = [(n, s) for n in names for s in severities]
    accuracies, ensembles = [], []  # per cell: [K]; per cell: [groups]
    for name, severity in tqdm(todo, desc="corruptions", disable=not progress, leave=False):
        test = corrupted(name, severity)
        probs = predict(test.images)
        accuracies.append((probs.argmax(-1) == test.labels).mean(-1))
        ensembles.append([float((probs[g].mean(0).argmax(-1) == test.labels).mean()) for g in groups])
    out = []
    for j, g in enumerate(groups):
        cells: dict[str, dict[str, Any]] = {}
        for (name, severity), accuracy, ensemble in zip(todo, accuracies, ensembles, strict=True):
            cells.setdefault(name, {})[str(severity)] = {"accuracy": accuracy[g].tolist(),
                                                        "ensemble_accuracy": ensemble[j]}
        mean = np.mean([a[g] for a in accuracies], axis=0)
        out.append({"cells": cells, "mean_accuracy": mean.tolist(), "statistics": seed_statistics(mean.tolist())})
    return out


def _subset(test: Split, count: int | None, key: jax.Array) -> Split:
    """``count`` test images drawn at random with ``key`` (sorted, so classes stay mixed as drawn), or all."""
    if count is None or count >= len(test):
        return test
    index = np.sort(np.asarray(jax.random.permutation(jax.random.fold_in(key, 999), len(test)))[:count])
    return test.take(index)


def _check_request(names: Sequence[str], severities: Sequence[int], corruption_images: int | None) -> None:
    """Refuse a request :func:`evaluate_robustness` cannot serve, before it evaluates anything."""
    unknown = sorted(set(names) - set(corruption_names()))
    if unknown:
        raise ConfigError(f"unknown corruption(s) {unknown}: use some of {corruption_names()}")
    bad = sorted(set(severities) - set(SEVERITIES))
    if bad:
        raise ConfigError(f"corruption severities {bad} are not in 1..5")
    if corruption_images is not None and corruption_images < 1:
        raise ConfigError(f"corruption_images {corruption_images} must be >= 1 (or None for the whole test set)")


def evaluate_robustness(result: FitResult, test: Split, *, corruptions: Sequence[str] | None = None,
                        severities: Sequence[int] = SEVERITIES, key: jax.Array | None = None,
                        corrupted: CorruptedSet | None = None, corruption_images: int | None = None,
                        weights: str = "best", batch_size: int | None = None, bins: int = ECE_BINS,
                        progress: bool = True) -> dict[str, Any]:
    """Robustness figures of the models of a ``fit`` result (one per run) on the ``test`` split: ``clean``
    (:func:`clean_metrics`: accuracy, calibration, per-class accuracy, disagreement, ensemble) and
    ``corruptions`` (:func:`corruption_accuracy`; every corruption of :mod:`jaxcifar.data.corruptions` unless
    ``corruptions`` names some, ``[]`` for none). The corrupted sets are ``test`` corrupted on the device with
    ``key`` (default ``PRNGKey(0)``), or ``corrupted(name, severity)`` when given (e.g. :func:`tfds_corruptions`;
    its ``source`` attribute, if any, describes it in the figures).
    ``corruption_images``: corrupt a random subset of that many test images (drawn with ``key``) instead of all,
    to bound the cost: each cell costs K forward passes over its images (generated corruptions only).
    ``weights``: ``'best'`` (the weights the summaries' test accuracy uses), ``'current'`` or ``'ema'``.

    A sweep over hyper-parameters is evaluated per variant (:func:`variants`: runs that differ only in their
    seed): the figures then hold ``variants``, a list of ``{"variant", "runs", "clean", "corruptions"}``, each
    with its own ensemble and seed statistics; ``result`` may come from :func:`~jaxcifar.train.load_sweep`."""
    names = corruption_names() if corruptions is None else list(corruptions)
    _check_request(names, severities, corruption_images)
    predict = _predictor_of(result, weights, batch_size or result.config.eval_batch_size)
    groups = variants(result.runs)
    probs = predict(test.images)
    parts = [{"clean": clean_metrics(probs[runs], test.labels, bins)} for _, runs in groups]
    if names:
        key = jax.random.PRNGKey(0) if key is None else key
        source, images = getattr(corrupted, "source", "the caller's corrupted sets"), None
        if corrupted is None:
            source = "generated on the device with the CIFAR-10-C parameters (jaxcifar.data.corruptions)"
            subset = _subset(test, corruption_images, key)
            corrupted, images = generated_corruptions(subset, key), len(subset)
        found = corruption_accuracy(predict, corrupted, names, severities, [runs for _, runs in groups], progress)
        for part, figures in zip(parts, found, strict=True):
            part["corruptions"] = {**figures, "severities": list(severities), "images": images, "source": source}
    out = {"weights": weights, "ece_bins": bins}
    if len(groups) == 1:
        return {**out, **parts[0]}
    return {**out, "variants": [{"variant": v, "runs": runs, **part} for (v, runs), part in zip(groups, parts,
                                                                                                  strict=True)]}
