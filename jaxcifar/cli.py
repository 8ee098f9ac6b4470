"""Shared command-line plumbing for ``experiments/``: common flags, data loading, error handling."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxcifar.data import Dataset, load_cifar
from jaxcifar.errors import ConfigError, JaxCifarError, OutputError, first_line
from jaxcifar.lock import DirectoryLock
from jaxcifar.train.config import TrainConfig, valid_seed, valid_val_size, validate_config
from jaxcifar.train.resume import ResumeFrom

QUICK_TRAIN, QUICK_TEST, QUICK_EPOCHS = 5000, 1000, 3


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except ``None`` ones (their help text says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _default_text(full: int, quick: int) -> str:
    return f"default {full}" + (f", {quick} with --quick" if quick != full else ", also with --quick")


def common_parser(description: str, *, epochs: int, batch_size: int, out: str, quick_batch_size: int | None = None,
                  val_size: int = 1000, quick_val_size: int = 500) -> argparse.ArgumentParser:
    """The options every experiment shares; the ``quick_*`` defaults apply with ``--quick``."""
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100"], help="which CIFAR")
    p.add_argument("--data", metavar="PATH", help="offline copy: ImageFolder directory or zip (default: tfds)")
    p.add_argument("--cache-dir", metavar="DIR", help="decoded-array cache (default ~/.cache/jaxcifar)")
    p.add_argument("--epochs", type=int, default=None, help=_default_text(epochs, QUICK_EPOCHS))
    p.set_defaults(full_epochs=epochs, full_batch_size=batch_size, quick_batch_size=quick_batch_size or batch_size,
                   full_val_size=val_size, quick_val_size=quick_val_size)
    p.add_argument("--batch-size", type=int, default=None,
                   help=_default_text(batch_size, quick_batch_size or batch_size))
    p.add_argument("--seed", type=int, default=0, help="seed of initialization, data order and augmentation")
    p.add_argument("--val-size", type=float, default=None,
                   help="validation examples held out of training (count, or fraction < 1); "
                        + _default_text(val_size, quick_val_size))
    p.add_argument("--out", default=out, help="output directory for results and checkpoints")
    p.add_argument("--quick", action="store_true",
                   help="a few-minute CPU version: 5000 training / 1000 test images, 3 epochs")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out and start over")
    p.add_argument("--resume-from-epoch", type=int, metavar="N",
                   help="resume from the checkpoint of epoch N instead of the latest (later ones are moved into "
                        "checkpoints/superseded/)")
    p.add_argument("--allow-config-change", metavar="FIELDS", type=_field_list, default=(),
                   help="resume although these changed (comma-separated, of learning_rate, weight_decay, "
                        "grad_clip_norm, epochs), e.g. after a divergence with --set learning_rate=... --set "
                        "grad_clip_norm=1, or --epochs under a schedule laid out over the epochs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--devices", type=int, default=None,
                   help="data-parallel over the first N devices (default: all); the batch must divide by N")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first (see docs/scaling.md)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a Python module first (repeatable), e.g. one that registers models and "
                        "augmentations with register_model / register_augmentation for --set model=NAME")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any TrainConfig field, e.g. --set learning_rate=0.01 --set "
                        "model_kwargs.dense='[256]' (VALUE is JSON, else a string; repeatable)")
    p.add_argument("--require-gpu", action="store_true",
                   help="stop with an error unless JAX runs on a GPU/TPU (instead of silently using the CPU)")
    p.add_argument("--deterministic", action="store_true",
                   help="identical GPU results run to run (--xla_gpu_deterministic_ops; slower on GPU, no effect "
                        "on CPU, which is deterministic already)")
    p.add_argument("--compile-cache", metavar="DIR", default=os.environ.get("JAXCIFAR_COMPILE_CACHE"),
                   help="keep compiled programs in DIR across runs (JAX's persistent compilation cache; "
                        "default: $JAXCIFAR_COMPILE_CACHE, unset = off)")
    return p



def preparsed(argv: list[str] | None, flag: str, default: str) -> str:
    """The value of one flag before the full parse, to choose defaults that depend on it (e.g. a recipe's
    epochs); an unknown value is left for the full parse to reject."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(flag, default=default)
    return getattr(pre.parse_known_args(argv)[0], flag.lstrip("-").replace("-", "_"))


def recipe_parser(description: str, config: TrainConfig, out: str, dataset: str = "cifar10"
                  ) -> argparse.ArgumentParser:
    """:func:`common_parser` whose epochs, batch size, validation size, seed and dataset default to
    ``config``'s (and ``dataset``)."""
    p = common_parser(description, epochs=config.epochs, batch_size=config.batch_size, val_size=config.val_size,
                      out=out)
    p.set_defaults(seed=config.seed, dataset=dataset)
    return p


def load_data(args: argparse.Namespace) -> Dataset:
    """Load ``args.dataset`` from ``args.data`` (or tfds); with ``--quick`` a seeded random subset."""
    ds = load_cifar(args.dataset, args.data, cache_dir=args.cache_dir, progress=not args.no_progress)
    if args.quick:
        rng = np.random.default_rng(args.seed)
        ds = Dataset(ds.name, ds.train.take(np.sort(rng.permutation(len(ds.train))[:QUICK_TRAIN])),
                     ds.test.take(np.sort(rng.permutation(len(ds.test))[:QUICK_TEST])), ds.class_names,
                     ds.coarse_class_names, f"{ds.source} (quick subset)")
    return ds


def data_line(data: Dataset, val_size: int | float) -> str:
    """The report sentence naming the data: source, split sizes."""
    return (f"Data: {data.source}, {len(data.train)} training images ({val_size} held out for validation), "
            f"{len(data.test)} test.")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` and fill the defaults that depend on ``--quick`` (epochs, batch and validation size)."""
    args = parser.parse_args(argv)
    for module in getattr(args, "imports", []):
        _import(module)
    if getattr(args, "deterministic", False):
        from jaxcifar._xla import deterministic_gpu

        deterministic_gpu()
    if getattr(args, "compile_cache", None):
        from jaxcifar.train.compilation import enable_compile_cache

        enable_compile_cache(args.compile_cache)
    if getattr(args, "distributed", False):  # first: it must precede anything that starts JAX's backend
        from jaxcifar.train.parallel import initialize_distributed

        initialize_distributed()
    if getattr(args, "require_gpu", False):
        from jaxcifar.train.plan import require_accelerator

        require_accelerator()
    if args.epochs is None:
        args.epochs = QUICK_EPOCHS if args.quick else args.full_epochs
    if args.batch_size is None:
        args.batch_size = args.quick_batch_size if args.quick else args.full_batch_size
    if args.val_size is None:
        args.val_size = args.quick_val_size if args.quick else args.full_val_size
    else:
        args.val_size = _val_size(args.val_size)
    if not valid_seed(args.seed):
        raise ConfigError(f"--seed {args.seed} must be an integer in [0, 2**32): e.g. --seed 0")
    args.resume = _resume_option(args)
    return args


def _val_size(value: float) -> int | float:
    """``--val-size`` as the library takes it: a count (an int) or a fraction in (0, 1)."""
    if not valid_val_size(value):
        raise ConfigError(f"--val-size {value:g} is neither a count nor a fraction: give a whole number of images "
                          "(e.g. 5000) or a fraction in (0, 1) (e.g. 0.1)")
    return value if 0 < value < 1 else int(value)


def _field_list(text: str) -> tuple[str, ...]:
    """``a,b`` → ``("a", "b")`` (for ``--allow-config-change``)."""
    return tuple(f.strip() for f in text.split(",") if f.strip())


def _resume_option(args: argparse.Namespace) -> bool | ResumeFrom:
    """``fit``'s ``resume`` from ``--no-resume``, ``--resume-from-epoch`` and ``--allow-config-change``."""
    special = args.resume_from_epoch is not None or args.allow_config_change
    if args.no_resume and special:
        raise ConfigError("--no-resume starts over: drop it to resume from an epoch or with changes")
    if special:
        return ResumeFrom(args.resume_from_epoch, args.allow_config_change)
    return not args.no_resume


def _import(module: str) -> None:
    """Import ``module`` (from the current directory too) for its registrations; a clear error if it fails."""
    import importlib

    sys.path.insert(0, os.getcwd())
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"--import {module}: {e}: give an importable module name (a file mymodels.py in the "
                          "current directory is `--import mymodels`)") from e


def run_main(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run ``main``; a jaxcifar error prints one line naming the problem and the fix and exits 2. The ``--out``
    locks ``main`` took are released when it ends, so a second call in the same process (a notebook, a driver
    script) can use the directory again."""
    try:
        main(argv)
    except JaxCifarError as e:
        print(f"error: {e.cli or e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted: checkpoints written so far are kept; run the same command again to resume",
              file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        while _OUT_LOCKS:
            _OUT_LOCKS.pop().release()


_OUT_LOCKS: list[DirectoryLock] = []  # taken by out_dir, released by run_main


def overridden(config: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """``config`` with the ``--set FIELD=VALUE`` overrides applied (``model_kwargs.NAME`` sets one model option)
    and validated; a bad field or value is a ``ConfigError`` naming it."""
    fields = config.to_dict()
    for item in getattr(args, "set", []):
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--set {item!r}: write FIELD=VALUE, e.g. --set learning_rate=0.01")
        head, _, option = name.partition(".")
        if head not in fields or (option and head != "model_kwargs"):
            raise ConfigError(f"--set {name}: no such config field; use one of {sorted(fields)} "
                              f"(or model_kwargs.OPTION)")
        value = _parsed(text)
        if option:
            fields["model_kwargs"] = {**fields["model_kwargs"], option: value}
        else:
            fields[head] = value
    try:
        result = TrainConfig.from_dict(fields)
    except TypeError as e:
        raise ConfigError(f"--set: {e}") from e
    validate_config(result)
    return result


def train(config: TrainConfig, args: argparse.Namespace, **fit_options: Any) -> tuple[Path, Dataset, Any]:
    """The experiments' middle part, once ``config`` is final (``--set`` applied): create ``--out``, load the
    data and train (or resume) into ``--out/checkpoints`` (``fit_options`` such as ``runs`` go to ``fit``);
    returns ``(out, data, fit result)``."""
    from jaxcifar.train import fit

    out = out_dir(args)
    data = load_data(args)
    result = fit(config, data, checkpoint_dir=str(out / "checkpoints"), resume=args.resume,
                 progress=not args.no_progress, **fit_options)
    return out, data, result


def selected_variants(parser: argparse.ArgumentParser, variants: dict[str, TrainConfig],
                      args: argparse.Namespace) -> dict[str, TrainConfig]:
    """A study's variants: those named by ``--only`` (all without it; an unknown name is a usage error), each
    with the ``--set`` overrides applied."""
    if args.only:
        unknown = set(args.only) - set(variants)
        if unknown:
            parser.error(f"unknown variant(s) {sorted(unknown)}: choose from {sorted(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.only}
    return {k: overridden(v, args) for k, v in variants.items()}


def _parsed(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (numbers, booleans, null, lists, objects), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def out_dir(args: argparse.Namespace) -> Path:
    """Create ``--out`` and lock it for this process (call it after every flag is checked, so a bad command
    line leaves nothing behind); a path that cannot be used is one ``OutputError`` line. The lock (released when
    :func:`run_main` returns or the process ends) makes a second process on the same ``--out`` stop at once."""
    path = Path(args.out)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {path} is a file: pass a directory (new or from an earlier run)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        if _is_process_zero():
            _OUT_LOCKS.append(DirectoryLock(path).acquire())
    except OSError as e:
        raise OutputError(f"cannot write into --out {path} ({first_line(e)}): pass a writable directory") from e
    return path


def _is_process_zero() -> bool:
    """Whether this is the first (or only) process of a job: in a multi-host job every process gets the same
    --out, and the first one locks it."""
    import jax

    return jax.process_index() == 0
