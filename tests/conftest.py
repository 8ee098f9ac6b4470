"""Shared fixtures: small generated datasets, written as ImageFolder trees or zips when needed."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxcifar.data.synthetic import synthetic_cifar

CLASSES = ("cat", "dog", "frog")


CACHE_KEY = pytest.StashKey[str]()


def pytest_configure(config) -> None:
    """One persistent compilation cache for this test session, in a new temporary directory: a program that
    several tests (or the experiment subprocesses) compile is compiled once. Compiled programs are reused
    only for an identical program (same HLO, XLA flags and jax version), so no result depends on it; set
    JAXCIFAR_TEST_COMPILE_CACHE=0 to run without it."""
    if os.environ.get("JAXCIFAR_TEST_COMPILE_CACHE", "1") == "0":
        return
    from jaxcifar.train import enable_compile_cache

    cache = tempfile.mkdtemp(prefix="jaxcifar-test-compile-cache-")
    config.stash[CACHE_KEY] = cache
    enable_compile_cache(cache)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache  # the experiments' subprocesses share it
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_unconfigure(config) -> None:
    cache = config.stash.get(CACHE_KEY, None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_image_folder(root: Path, per_class: dict[str, int], classes=CLASSES, seed: int = 0) -> dict:
    """Write ``root/{train,test}/<class>/NNNN.png`` with random images; returns the arrays written."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in per_class.items():
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                (d / f"{i:04d}.png").write_bytes(png_bytes(img))
                written[(split, c, i)] = img
    return written


def zip_tree(src: Path, dest: Path, prefix: str = "cifar10/") -> Path:
    with zipfile.ZipFile(dest, "w") as z:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                z.write(f, prefix + f.relative_to(src).as_posix())
    return dest


@pytest.fixture
def folder(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "data"
    return root, write_image_folder(root, {"train": 6, "test": 2})


@pytest.fixture(scope="session")
def tiny() -> object:
    """512 train / 128 test generated images of 10 learnable classes."""
    return synthetic_cifar(512, 128, 10, seed=0, noise=60.0)


def strip_times(histories):
    """Histories without the wall-clock ``epoch_seconds``, for comparing runs' figures exactly."""
    return [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in histories]


def steps_on_one_batch(config, dataset, steps: int = 8):
    """Train ``steps`` jitted steps of ``config`` on the first batch of ``dataset``; return ``(fns, state,
    losses)``."""
    import jax

    from jaxcifar.train import build, init_state, prepare_data

    data = prepare_data(dataset, config)
    fns = build(config, data)
    state = init_state(config, fns, None, data.train[0])
    step = jax.jit(fns.train_step)
    batch = (data.train[0][:config.batch_size], data.train[1][:config.batch_size])
    losses = []
    for i in range(steps):
        state, m = step(state, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    return fns, state, losses


REAL_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_jpeg.zip"


def real_cifar10_subset(cache_dir: Path, train: int = 5000, test: int = 2000):
    """A seeded random subset of the shared real CIFAR-10 copy (for ``realdata`` tests); fails loudly when the
    copy is missing."""
    from jaxcifar.data import Dataset, load_cifar

    assert REAL_ZIP.exists(), f"shared CIFAR-10 copy missing at {REAL_ZIP}: CI must provide ../shared/data"
    full = load_cifar("cifar10", REAL_ZIP, cache_dir=cache_dir, progress=False)
    rng = np.random.default_rng(0)
    return Dataset(full.name, full.train.take(np.sort(rng.permutation(len(full.train))[:train])),
                   full.test.take(np.sort(rng.permutation(len(full.test))[:test])), full.class_names, None, "subset")


def sweep_matches_single_runs(swept, config, data, runs, loss_rtol: float = 1e-4, param_rtol: float = 2e-2) -> None:
    """Each run of the ``fit(config, data, runs=runs)`` result ``swept`` has its single run's training losses
    (to ``loss_rtol``) and parameters (each leaf's relative distance below ``param_rtol``)."""
    import jax
    import jax.numpy as jnp

    from jaxcifar.train import fit, unstack_state

    for k, run in enumerate(runs):
        single = fit(config.replace(**run), data, progress=False)
        np.testing.assert_allclose(swept.histories[k]["train_loss"], single.history["train_loss"], rtol=loss_rtol)
        pairs = zip(jax.tree.leaves(unstack_state(swept.state, k).params), jax.tree.leaves(single.state.params),
                    strict=True)
        for a, b in pairs:
            assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < param_rtol


class Interrupt(Exception):
    """Raised by :func:`interrupt_after`'s epoch hook: a fit stopped the way a killed process would be."""


def interrupt_after(cfg, dataset, directory, epoch: int, **fit_options) -> None:
    """``fit`` into ``directory``, killed (an exception from the epoch hook) after epoch ``epoch``."""
    from jaxcifar.train import fit

    def stop(e, _):
        if e == epoch:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(cfg, dataset, checkpoint_dir=str(directory), progress=False, on_epoch_end=stop, **fit_options)
