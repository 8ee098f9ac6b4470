"""What happens when things go wrong: damaged checkpoints and caches, damaged data, bad command lines, a busy
output directory, runs that diverge, file permissions. Each test names the guarantee it checks (the list is in
docs/guide.md, "What happens when things go wrong")."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import strip_times, write_image_folder, zip_tree

from jaxcifar import cli
from jaxcifar.data import load_cifar
from jaxcifar.errors import CheckpointError, ConfigError, DataError, OutputError
from jaxcifar.lock import DirectoryLock
from jaxcifar.report import divergence_note, write_json
from jaxcifar.train import ResumeFrom, TrainConfig, checkpoint_manager, fit
from jaxcifar.train import checkpoint as ckpt
from jaxcifar.train.history import history_problem

FAST = TrainConfig(epochs=3, batch_size=32, val_size=64, learning_rate=0.01, log_every=4, unroll=2,
                   eval_batch_size=64, keep_checkpoints=5)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A 3-epoch fit with a checkpoint after every epoch, and the 4-epoch fit it resumes to uninterrupted."""
    directory = tmp_path_factory.mktemp("trained") / "ck"
    three = fit(FAST, tiny, checkpoint_dir=str(directory), progress=False)
    four = fit(FAST.replace(epochs=4), tiny, progress=False)
    return directory, three, four


def damage(path: Path, how: str) -> None:
    """Damage checkpoint directory ``path`` the way a crash, a full disk or bit rot would."""
    largest = max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if how == "truncate":
        largest.write_bytes(largest.read_bytes()[:1000])
    elif how == "delete":
        largest.unlink()
    elif how == "metadata":
        (path / "state" / "_METADATA").unlink()
    else:  # one flipped bit in the middle of the largest array file
        data = bytearray(largest.read_bytes())
        data[len(data) // 2] ^= 0x10
        largest.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "delete", "metadata", "bitflip"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(trained, tiny, tmp_path, capfd, how):
    directory, _, four = trained
    copy = tmp_path / "ck"
    shutil.copytree(directory, copy)
    damage(copy / "3", how)
    result = fit(FAST.replace(epochs=4), tiny, checkpoint_dir=str(copy), progress=False)
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "checkpoint" in warnings[0] and "/3 is damaged" in warnings[0], err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert (copy / "damaged" / "3").is_dir() and {3, 4} <= set(checkpoint_manager(copy).all_steps())
    # resumed after epoch 2 and trained 3 and 4 again: the same numbers as the uninterrupted run (CPU)
    assert strip_times(result.histories) == strip_times(four.histories)
    assert result.summaries == four.summaries


def test_no_usable_checkpoint_is_one_line_and_nothing_moves(trained, tiny, tmp_path):
    directory, _, _ = trained
    copy = tmp_path / "ck"
    shutil.copytree(directory, copy)
    steps = sorted(checkpoint_manager(copy).all_steps())
    for step in steps:
        damage(copy / str(step), "metadata")
    with pytest.raises(CheckpointError, match="no usable checkpoint .*all 3 damaged.*resume=False") as e:
        fit(FAST.replace(epochs=4), tiny, checkpoint_dir=str(copy), progress=False)
    assert "\n" not in str(e.value) and not (copy / "damaged").exists() and "--no-resume" in e.value.cli
    assert sorted(checkpoint_manager(copy).all_steps()) == steps


def test_a_shortened_saved_history_is_damage(trained, tiny, tmp_path):
    directory, _, four = trained
    copy = tmp_path / "ck"
    shutil.copytree(directory, copy)
    meta_file = copy / "3" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["histories"][0]["val_accuracy"] = meta["histories"][0]["val_accuracy"][:2]
    meta_file.write_text(json.dumps(meta))
    (copy / "3" / ckpt.CHECKSUMS).unlink()  # as if edited where no checksums exist: the history check finds it
    result = fit(FAST.replace(epochs=4), tiny, checkpoint_dir=str(copy), progress=False)
    assert strip_times(result.histories) == strip_times(four.histories) and (copy / "damaged" / "3").is_dir()


def test_history_problem_names_what_is_wrong():
    h = {"epoch": [1, 2], "train_loss": [1.0, 0.5], "val_loss": [1.0], "interval": {"step": [4]}}
    assert history_problem(h, 2) == "its history's ['val_loss'] do not hold 2 epochs"
    assert "epochs 1..3" in history_problem(h, 3)
    assert history_problem({**h, "val_loss": [1.0, 0.9]}, 2) is None


def test_best_and_pruning_survive_a_restart(tiny, tmp_path):
    """The selection metric is written into each checkpoint, so a new manager (a restart) knows the best one
    and keeps the latest ``keep`` plus it."""
    cfg = FAST.replace(epochs=4, keep_checkpoints=1, schedule="step", step_epochs=(1,), step_factor=2.0)
    fit(cfg, tiny, checkpoint_dir=str(tmp_path / "ck"), progress=False)
    saved = json.loads((tmp_path / "ck" / "4" / "meta" / "metadata").read_text())
    accuracies = saved["histories"][0]["val_accuracy"]
    best = 1 + int(np.argmax(accuracies))
    manager = checkpoint_manager(tmp_path / "ck")
    assert manager.best_step() == best and sorted(manager.all_steps()) == sorted({best, 4})
    fit(cfg.replace(epochs=5), tiny, checkpoint_dir=str(tmp_path / "ck"), progress=False)
    after = checkpoint_manager(tmp_path / "ck")
    best_now = 1 + int(np.argmax(json.loads((tmp_path / "ck" / "5" / "meta" / "metadata").read_text())
                                 ["histories"][0]["val_accuracy"]))
    assert sorted(after.all_steps()) == sorted({best_now, 5}) and after.best_step() == best_now


def test_starting_over_sets_old_checkpoints_aside(trained, tiny, tmp_path):
    """``resume=False`` in a directory with checkpoints moves them into superseded/: a later resume must not
    pick up an epoch of the old run."""
    directory, _, _ = trained
    copy = tmp_path / "ck"
    shutil.copytree(directory, copy)
    fit(FAST.replace(epochs=1), tiny, checkpoint_dir=str(copy), resume=False, progress=False)
    assert checkpoint_manager(copy).all_steps() == [1]
    assert sorted(p.name for p in (copy / "superseded").iterdir()) == ["1", "2", "3"]


def test_resume_from_an_earlier_epoch(trained, tiny, tmp_path):
    directory, three, _ = trained
    copy = tmp_path / "ck"
    shutil.copytree(directory, copy)
    again = fit(FAST, tiny, checkpoint_dir=str(copy), resume=ResumeFrom(epoch=1), progress=False)
    assert strip_times(again.histories) == strip_times(three.histories)
    assert sorted(p.name for p in (copy / "superseded").iterdir()) == ["2", "3"]
    with pytest.raises(CheckpointError, match="no checkpoint of epoch 7"):
        fit(FAST, tiny, checkpoint_dir=str(copy), resume=ResumeFrom(epoch=7), progress=False)
    with pytest.raises(ConfigError, match="cannot change \\['momentum'\\]"):
        ResumeFrom(allow_changes=("momentum",))


def test_after_a_divergence_go_on_with_a_lower_learning_rate_and_clipping(tiny, tmp_path):
    from jaxcifar.errors import TrainingError

    ck = str(tmp_path / "ck")
    fit(FAST.replace(epochs=1), tiny, checkpoint_dir=ck, progress=False)
    allow = ResumeFrom(allow_changes=("learning_rate", "grad_clip_norm"))
    with pytest.raises(TrainingError, match="NaN/inf in epoch 2: the last good checkpoint is epoch 1"):
        fit(FAST.replace(learning_rate=1e30), tiny, checkpoint_dir=ck, resume=allow, progress=False)
    with pytest.raises(ConfigError, match=r"another learning_rate \(0.01 -> 0.005\)"):  # changes need the permission
        fit(FAST.replace(learning_rate=0.005), tiny, checkpoint_dir=ck, progress=False)
    result = fit(FAST.replace(learning_rate=0.005, grad_clip_norm=1.0), tiny, checkpoint_dir=ck, resume=allow,
                 progress=False)
    h = result.history
    assert h["epoch"] == [1, 2, 3] and h["lr"][0] == pytest.approx(0.01) and h["lr"][1] == pytest.approx(0.005)
    assert h["train_loss"][2] < h["train_loss"][0]
    assert result.meta["config_changes"] == [{"resumed_after_epoch": 1, "changes": {
        "learning_rate": [0.01, 0.005], "grad_clip_norm": [None, 1.0]}}]
    saved = json.loads((tmp_path / "ck" / "3" / "meta" / "metadata").read_text())
    assert saved["config_changes"] == result.meta["config_changes"]  # a later resume keeps the record


def test_switching_clipping_on_carries_the_optimizer_state_over_exactly(trained, tiny, tmp_path):
    """A clip too large to act changes nothing: resuming with it must give the uninterrupted run's numbers, so
    the momentum moved into the new optimizer's structure unchanged."""
    directory, _, four = trained
    copy = tmp_path / "ck"
    shutil.copytree(directory, copy)
    result = fit(FAST.replace(epochs=4, grad_clip_norm=1e30), tiny, checkpoint_dir=str(copy),
                 resume=ResumeFrom(allow_changes=("grad_clip_norm",)), progress=False)
    assert strip_times(result.histories) == strip_times(four.histories)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_a_diverging_run_in_a_sweep_is_frozen_and_the_others_finish(tiny, strategy):
    cfg = FAST.replace(epochs=2, run_strategy=strategy)
    runs = [{"learning_rate": 0.01}, {"learning_rate": 1e30}, {"learning_rate": 0.02}]
    swept = fit(cfg, tiny, runs=runs, progress=False)
    assert [s["diverged_at_epoch"] for s in swept.summaries] == [None, 1, None]
    assert swept.summaries[1]["best_epoch"] == 0  # never "best" after it diverged
    single = fit(cfg.replace(learning_rate=0.02, split_seed=0), tiny, progress=False)
    # loop: the single run's operations (a re-associated reduction at most: ~1e-7 grown over 28 steps, 1e-5);
    # vmap: grouped convolutions, another summation order throughout, grown over 28 steps to 2.5e-4 (measured,
    # Zen 4): 1e-3 (conftest.VMAP_LOSS_RTOL is for the 14-21-step sweeps)
    rtol = 1e-5 if strategy == "loop" else 1e-3
    np.testing.assert_allclose(swept.histories[2]["train_loss"], single.history["train_loss"], rtol=rtol)
    assert swept.histories[1]["train_loss"][1] is None  # NaN is recorded as None (valid JSON)
    note = divergence_note(["a", "b", "c"], swept.summaries)
    assert "b (epoch 1)" in note and "a (" not in note and divergence_note(["a"], swept.summaries[:1]) == ""


# ------------------------------------------------------------------------------------------------- cache


@pytest.fixture
def tiny_zip(tmp_path) -> Path:
    src = tmp_path / "src"
    write_image_folder(src, {"train": 4, "test": 2}, classes=tuple(f"c{i}" for i in range(10)))
    return zip_tree(src, tmp_path / "tiny.zip")


def _poison(cache_file: Path, how: str) -> None:
    good = cache_file.read_bytes()
    if how == "truncated":
        cache_file.write_bytes(good[:len(good) // 2])
    elif how == "empty":
        cache_file.write_bytes(b"")
    elif how == "bitflip":
        cache_file.write_bytes(good[:5000] + bytes([good[5000] ^ 0xFF]) + good[5001:])
    else:
        arrays = dict(np.load(cache_file))
        if how == "key_missing":
            del arrays["test_labels"]
        else:  # wrong image shape
            arrays["train_images"] = arrays["train_images"][:, :16]
        with cache_file.open("wb") as f:
            np.savez(f, **arrays)


@pytest.mark.parametrize("how", ["truncated", "empty", "bitflip", "key_missing", "wrong_shape"])
def test_a_damaged_cache_is_rebuilt_once(tiny_zip, tmp_path, capfd, how):
    cache = tmp_path / "cache"
    first = load_cifar("cifar10", tiny_zip, cache_dir=cache, progress=False)
    cache_file = next(cache.glob("*.npz"))
    _poison(cache_file, how)
    again = load_cifar("cifar10", tiny_zip, cache_dir=cache, progress=False)
    err = capfd.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("warning: the cache file") and "rebuilding it" in err, err
    np.testing.assert_array_equal(again.train.images, first.train.images)
    load_cifar("cifar10", tiny_zip, cache_dir=cache, progress=False)  # repaired: silent now
    assert capfd.readouterr().err == ""


def test_an_unusable_cache_dir_loads_without_a_cache(tiny_zip, tmp_path, capfd, monkeypatch):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    ds = load_cifar("cifar10", tiny_zip, cache_dir=not_a_dir, progress=False)
    assert len(ds.train) == 40 and "going on without a cache" in capfd.readouterr().err

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("jaxcifar.data.cache.tempfile.mkstemp", read_only)
    ds = load_cifar("cifar10", tiny_zip, cache_dir=tmp_path / "ro", progress=False)
    err = capfd.readouterr().err.strip()
    assert len(ds.train) == 40 and err.count("\n") == 0 and "PermissionError" in err


# -------------------------------------------------------------------------------------------------- data


def test_a_bad_crc_is_one_data_error(tiny_zip, tmp_path):
    raw = bytearray(tiny_zip.read_bytes())
    with zipfile.ZipFile(tiny_zip) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(".png"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + info.compress_size // 2] ^= 0xFF  # a stored member's bytes change; its CRC no longer matches
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"cannot read {info.filename} .*Bad CRC-32.*copy or download it again"):
        load_cifar("cifar10", bad, use_cache=False, progress=False)


def test_an_empty_class_folder_is_refused_by_name(tmp_path):
    root = tmp_path / "data"
    write_image_folder(root, {"train": 2, "test": 1}, classes=tuple(f"c{i}" for i in range(10)))
    for f in (root / "train" / "c3").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"class folder\(s\) \['c3'\] under train/ .* hold no images"):
        load_cifar("cifar10", root, use_cache=False, progress=False)


def test_a_wrong_image_size_says_height_by_width(tmp_path):
    from PIL import Image

    root = tmp_path / "data"
    write_image_folder(root, {"train": 1, "test": 1}, classes=tuple(f"c{i}" for i in range(10)))
    Image.new("RGB", (48, 64)).save(root / "train" / "c0" / "0000.png")  # PIL sizes are (width, height)
    with pytest.raises(DataError, match=r"is 64x48 \(height x width\)"):
        load_cifar("cifar10", root, use_cache=False, progress=False)


# ----------------------------------------------------------------------------------------- command line


def run_sweep(argv, capsys):
    """``experiments.dropout_sweep`` in this process; ``(exit code, stderr)``."""
    from experiments import dropout_sweep

    with pytest.raises(SystemExit) as e:
        cli.run_main(dropout_sweep.main, argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--val-size", "2.5"], "--val-size 2.5 is neither a count nor a fraction"),
    (["--val-size", "inf"], "--val-size inf is neither"),
    (["--val-size", "-3"], "--val-size -3 is neither"),
    (["--seed", "-1", "--quick"], "--seed -1 must be an integer in [0, 2**32)"),
    (["--epochs", "0"], "epochs 0 must be >= 1"),
    (["--set", "b2=2.0"], "b2 2.0 must be in [0, 1)"),
    (["--no-resume", "--resume-from-epoch", "2"], "--no-resume starts over"),
    (["--allow-config-change", "momentum"], "cannot change ['momentum'] on resume"),
])
def test_bad_flags_are_one_line_before_anything_is_created(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    code, err = run_sweep(["--data", str(tmp_path / "never-read.zip"), "--out", str(out), *flags], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and message in err, err
    assert not out.exists()


def test_an_unusable_out_is_one_line(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, err = run_sweep(["--data", str(tmp_path / "x.zip"), "--out", str(a_file)], capsys)
    assert code == 2 and "is a file: pass a directory" in err and err.strip().count("\n") == 0

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    code, err = run_sweep(["--data", str(tmp_path / "x.zip"), "--out", str(tmp_path / "ro" / "out")], capsys)
    assert code == 2 and "cannot write into --out" in err and err.strip().count("\n") == 0


def test_a_busy_out_is_refused_with_the_owner_pid(tiny_zip, tiny, tmp_path, capsys):
    out = tmp_path / "out"
    with DirectoryLock(out):  # this process holds it, as another run would
        code, err = run_sweep(["--data", str(tiny_zip), "--out", str(out), "--cache-dir", str(tmp_path / "c")],
                              capsys)
    assert code == 2 and f"in use by PID {os.getpid()}" in err and err.strip().count("\n") == 0
    # fit locks its checkpoint directory too
    with pytest.raises(OutputError, match="in use by PID"), DirectoryLock(tmp_path / "ck"):
        fit(FAST, tiny, checkpoint_dir=str(tmp_path / "ck"), progress=False)
    with DirectoryLock(out):  # released: usable again
        pass


# ------------------------------------------------------------------------------------------------ files


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_results_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~umask
