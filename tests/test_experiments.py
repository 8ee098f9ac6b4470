"""The main job end to end on generated data: outputs written, resumable, clear errors."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder, zip_tree

from jaxcifar import cli

ROOT = Path(__file__).resolve().parents[1]
CLASSES = tuple(f"c{i}" for i in range(10))


def command(*args, experiment="dropout_sweep"):
    """``python -m experiments.<experiment> *args`` as its own process."""
    return subprocess.run([sys.executable, "-m", f"experiments.{experiment}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def run(*args, experiment="dropout_sweep"):
    """What :func:`command` does, in this process: the experiment's ``main`` behind its command line's error
    handling (``cli.run_main``), its output captured; the exit status as a process would have it. Saves a
    process start (~3 s) and shares compiled programs with the tests before it; :func:`command` is kept where
    the process itself is under test (the main job's exit status, a process-wide compilation cache)."""
    module = importlib.import_module(f"experiments.{experiment}")
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.run_main(module.main, [str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess([experiment, *args], code, out.getvalue(), err.getvalue())


def run_tiny(tmp_path, experiment, *args, run=run):
    """Run ``experiment`` on a generated 10-class zip (120 train / 40 test, 20 held out); return
    ``(out dir, results.json)``."""
    out = tmp_path / "out"
    r = run("--data", str(tiny_zip(tmp_path)), "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
            "--val-size", "20", "--no-progress", *args, experiment=experiment)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def tiny_zip(tmp_path, train=12, test=4):
    src = tmp_path / "src"
    write_image_folder(src, {"train": train, "test": test}, classes=CLASSES)
    return zip_tree(src, tmp_path / "tiny.zip")


def test_dropout_sweep_writes_report_and_resumes(tmp_path):
    src = tmp_path / "src"
    write_image_folder(src, {"train": 12, "test": 4}, classes=CLASSES)
    data = zip_tree(src, tmp_path / "tiny.zip")
    out = tmp_path / "out"
    common = ["--data", str(data), "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--val-size", "20",
              "--batch-size", "25", "--rates", "0", "0.5", "--seeds", "2", "--no-progress"]
    first = command(*common, "--epochs", "1")  # the main job as its own process; the resume below in this one
    assert first.returncode == 0, first.stderr[-3000:]
    for name in ("results.json", "report.md", "curves.png", "val_accuracy.png", "forest.png"):
        assert (out / name).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    assert [(r["dropout_rate"], r["seed"]) for r in res["runs"]] == [(0.0, 0), (0.0, 1), (0.5, 0), (0.5, 1)]
    assert res["meta"]["run_axis"] and res["meta"]["environment"]["packages"]["jax"]
    # The comparison pairs each rate's two seeds; the score matrix has one record per run.
    comparison = res["comparison"]
    assert {v["n"] for v in comparison["variants"].values()} == {2}
    other = next(iter(comparison["differences"].values()))
    assert other["paired"] and other["seeds"] == [0, 1]
    assert [(r["variant"], r["seed"]) for r in res["scores"]] == [(0.0, 0), (0.0, 1), (0.5, 0), (0.5, 1)]
    assert res["winner_rate"] == comparison["winner"]
    report = (out / "report.md").read_text()
    assert "t interval" in report and ("Winner: p" in report) == (comparison["winner"] is not None)
    # A second call with more epochs resumes from the checkpoint: epoch 1 is not trained again.
    second = run(*common, "--epochs", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    res2 = json.loads((out / "results.json").read_text())
    assert res2["histories"][0]["epoch"] == [1, 2]
    assert res2["histories"][0]["val_accuracy"][0] == res["histories"][0]["val_accuracy"][0]
    assert "epoch 1/2" not in second.stdout + second.stderr


def test_bad_data_path_is_one_clear_line(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    r = command("--data", str(tmp_path / "missing.zip"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_robustness_reports_seed_statistics(tmp_path):
    out, res = run_tiny(tmp_path, "robustness", "--batch-size", "25", "--epochs", "1", "--seeds", "3",
                        "--split-per-run", "--corruptions", "gaussian_noise,contrast", "--severities", "1,5")
    acc = np.array([s["test_accuracy"] for s in res["summaries"]])
    st = res["statistics"]["test_accuracy"]
    assert [run["seed"] for run in res["runs"]] == [0, 1, 2] and st["n"] == 3
    assert st["mean"] == pytest.approx(acc.mean()) and st["std"] == pytest.approx(acc.std(ddof=1))
    # Student's t quantile for 2 degrees of freedom, 4.3027 (the exact one, as for every n); float64 figures
    assert st["ci95_high"] - st["mean"] == pytest.approx(4.302653 * acc.std(ddof=1) / np.sqrt(3), rel=1e-6)
    assert len({tuple(h["train_loss"]) for h in res["histories"]}) == 3  # the seeds really differ
    assert res["config"]["split_per_run"] and res["meta"]["split_per_run"]
    assert (out / "val_accuracy.png").stat().st_size > 0 and "95 % CI" in (out / "report.md").read_text()
    # The robustness figures: evaluated on the same weights as the summaries, every requested cell present.
    rob = res["robustness"]
    np.testing.assert_allclose(rob["clean"]["accuracy"], acc, atol=1e-6)  # as in test_robustness
    assert sorted(rob["corruptions"]["cells"]) == ["contrast", "gaussian_noise"]
    assert sorted(rob["corruptions"]["cells"]["contrast"]) == ["1", "5"]
    assert len(rob["clean"]["disagreement"]) == 3 and len(rob["clean"]["bin_count"][0]) == 15
    for name in ("ensemble.png", "disagreement.png", "per_class_accuracy.png", "reliability.png", "corruptions.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "Ensemble of the 3 seeds" in report and "Common corruptions" in report


def test_robustness_runs_a_reference_recipe_with_its_own_defaults(tmp_path):
    out, res = run_tiny(tmp_path, "robustness", "--recipe", "d_wide", "--width", "0.0625", "--epochs", "1",
                        "--seeds", "2", "--batch-size", "25", "--corruptions", "none")
    assert [r["seed"] for r in res["runs"]] == [42, 43]  # report D's seed
    config = res["config"]
    assert config["init"] == "torch" and config["model_kwargs"]["kernel_size"] == [3, 5]
    assert config["model_kwargs"]["channels"] == [[16, 32], [16, 8]] and "corruptions" not in res["robustness"]


def test_reference_trains_a_named_recipe_beside_the_reported_figures(tmp_path):
    out, res = run_tiny(tmp_path, "reference", "--recipe", "c_improved", "--epochs", "1", "--batch-size", "25")
    assert res["recipe"] == "c_improved" and res["reported"].endswith("test 80.15 %")
    assert res["config"]["model_kwargs"]["activation"] == "gelu_exact" and res["config"]["learning_rate"] == 0.01
    assert res["history"]["epoch"] == [1] and (out / "curves.png").stat().st_size > 0
    assert "Reported by the reference report" in (out / "report.md").read_text()


@pytest.mark.parametrize(("flags", "message"), [
    (["--corruptions", "fog"], "unknown ['fog']"),
    (["--severities", "0,9"], "--severities"),
    (["--corruption-images", "0"], "--corruption-images 0"),
    (["--recipe", "baseline", "--width", "2"], "--width applies"),
])
def test_robustness_bad_flags_fail_before_anything_is_written(tmp_path, flags, message):
    r = run("--data", str(tmp_path / "missing.zip"), "--out", str(tmp_path / "out"), *flags,
            experiment="robustness")
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_baseline_writes_report_and_model(tmp_path):
    cache = tmp_path / "compile-cache"
    out, res = run_tiny(tmp_path, "baseline", "--batch-size", "25", "--epochs", "2", "--compile-cache", str(cache),
                        run=command)  # its own process: --compile-cache sets a process-wide cache
    # every program fit compiles to train and evaluate was kept (one file per distinct program; a program compiled
    # twice, or served from the cache, counts twice in meta["compilations"], which also counts the data's set-up)
    kept = {p.name.split("-")[0] for p in cache.iterdir()}
    assert {"jit_fresh", "jit_run", "jit_order", "jit_end_epoch", "jit_evaluate"} <= kept
    assert 0 < len(list(cache.iterdir())) <= res["meta"]["compilations"]
    assert res["history"]["epoch"] == [1, 2] and 1 <= res["summary"]["best_epoch"] <= 2
    assert res["summary"]["best_val_accuracy"] == max(res["history"]["val_accuracy"])
    assert res["config"]["optimizer"] == "sgd" and res["config"]["learning_rate"] == 1e-3
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert (out / "curves.png").stat().st_size > 0 and "Best validation accuracy" in (out / "report.md").read_text()


def test_predictions_trains_normalized_and_raw_models(tmp_path):
    out, res = run_tiny(tmp_path, "predictions", "--batch-size", "25", "--epochs", "1", "--count", "6")
    assert {k: v["normalize"] for k, v in res["models"].items()} == {"normalized": True, "raw": False}
    for name in ("normalized", "raw"):
        assert (out / f"grid_{name}.png").stat().st_size > 0
        rows = (out / f"probabilities_{name}.csv").read_text().strip().splitlines()
        assert len(rows) == 7  # header + 6 images
        probs = np.array([[float(v) for v in row.split(",")[3:]] for row in rows[1:]])
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=6e-3)  # rounded to 3 decimals
    bad = run("--data", str(tmp_path / "tiny.zip"), "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
              "--checkpoint", str(tmp_path / "nope"), experiment="predictions")
    assert bad.returncode == 2 and "no checkpoint directory" in bad.stderr


def test_dataset_report_counts_and_statistics(tmp_path):
    out, res = run_tiny(tmp_path, "dataset_report")
    assert res["sizes"] == {"train": 100, "validation": 20, "test": 40}
    assert [sum(c) for c in res["class_counts"].values()] == [100, 40, 20]
    assert res["class_counts"]["test"] == [4] * 10
    assert res["normalization_check_train"]["ok"]
    np.testing.assert_allclose(res["normalization_check_train"]["mean"], 0.0, atol=1e-4)
    for name in ("class_histograms.png", "examples.png", "examples_normalized.png"):
        assert (out / name).stat().st_size > 0


def test_improved_ablation_table(tmp_path):
    out, res = run_tiny(tmp_path, "improved", "--batch-size", "50", "--epochs", "1", "--only", "full",
                        "no augmentation", "--seeds", "2")
    assert list(res["variants"]) == ["full", "no augmentation"]
    full, ablated = (res["variants"][k]["config"] for k in ("full", "no augmentation"))
    assert full["model_kwargs"]["batch_norm"] and full["optimizer"] == "adamw" and full["augment"]
    assert ablated["augment"] == [] and {k: v for k, v in ablated.items() if k != "augment"} == \
        {k: v for k, v in full.items() if k != "augment"}
    # Each variant's two seeds in one program, compared with the full recipe, paired by seed.
    assert [len(v["summaries"]) for v in res["variants"].values()] == [2, 2]
    assert res["comparison"]["reference"] == "full" and list(res["comparison"]["differences"]) == ["no augmentation"]
    assert len(res["scores"]) == 4 and (out / "forest.png").stat().st_size > 0
    assert "full - no augmentation" in (out / "report.md").read_text()
    bad = run("--data", str(tmp_path / "tiny.zip"), "--out", str(out), "--only", "nonsense", experiment="improved")
    assert bad.returncode == 2 and "unknown variant" in bad.stderr


def test_cifar100_study_fine_tunes_a_cifar10_body(tmp_path, tiny):
    from jaxcifar.train import TrainConfig, fit

    pre = tmp_path / "c10"
    fit(TrainConfig(model="resnet20", epochs=1, batch_size=224, val_size=64), tiny,
        checkpoint_dir=str(pre), progress=False)
    src = tmp_path / "c100"
    write_image_folder(src, {"train": 2, "test": 1}, classes=tuple(f"k{i:02d}" for i in range(100)))
    out = tmp_path / "out"
    r = run("--data", str(src), "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--val-size", "20",
            "--batch-size", "90", "--epochs", "1", "--no-progress", "--resnet", "resnet20", "--pretrained", str(pre),
            "--only", "convnet", "resnet20 fine-tuned from cifar10", "--seeds", "1", experiment="cifar100_study")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["variants"]["resnet20 fine-tuned from cifar10"]["fine_tuned"]
    assert not res["variants"]["convnet"]["fine_tuned"]
    cfg = res["variants"]["convnet"]["config"]
    assert (cfg["optimizer"], cfg["learning_rate"]) == ("adam", 1e-4)
    # Without --pretrained the fine-tuned variant is skipped, said in the results (the convnet, finished above,
    # is reopened from its checkpoint, not trained again).
    skipped = run("--data", str(src), "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--val-size", "20",
                  "--batch-size", "90", "--epochs", "1", "--no-progress", "--resnet", "resnet20", "--only", "convnet",
                  "resnet20 fine-tuned from cifar10", "--seeds", "1", experiment="cifar100_study")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    assert again["skipped"] and list(again["variants"]) == ["convnet"]
    assert again["variants"]["convnet"]["summaries"] == res["variants"]["convnet"]["summaries"]


def test_speedrun_reports_runs_and_resumes(tmp_path):
    out, res = run_tiny(tmp_path, "speedrun", "--batch-size", "25", "--epochs", "1", "--runs", "2", "--val-size", "0")
    assert [r["seed"] for r in res["runs"]] == [0, 1] and res["train_size"] == 120
    assert res["config"]["model"] == "speedrun" and res["config"]["tta"] == 2
    assert res["statistics"]["n"] == 2 and all(r["train_seconds"] > 0 for r in res["runs"])
    assert res["statistics"]["mean"] == pytest.approx(np.mean([r["test_accuracy"] for r in res["runs"]]))
    assert res["histories"][0]["train_loss"] != res["histories"][1]["train_loss"]
    assert res["target_test"]["target"] == 0.94 and res["target_test"]["n"] == 2
    assert "Mean >= 94.00 %" in (out / "report.md").read_text()
    for name in ("report.md", "accuracy.png", "curves.png"):
        assert (out / name).stat().st_size > 0
    # A third run resumes the series: the first two are kept, not trained again.
    r = run("--data", str(tmp_path / "tiny.zip"), "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
            "--batch-size", "25", "--epochs", "1", "--runs", "3", "--val-size", "0", "--no-progress",
            experiment="speedrun")
    assert r.returncode == 0, r.stderr[-3000:]
    res3 = json.loads((out / "results.json").read_text())
    assert res3["runs"][:2] == res["runs"] and "run 1/3" not in r.stdout and "run 3/3" in r.stdout
    # A different recipe in the same directory is refused with one clear line.
    bad = run("--data", str(tmp_path / "tiny.zip"), "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
              "--batch-size", "20", "--epochs", "1", "--runs", "3", "--val-size", "0", experiment="speedrun")
    assert bad.returncode == 2 and "different config" in bad.stderr and bad.stderr.strip().count("\n") == 0


def test_speedrun_muon_recipe_trains_with_its_own_defaults(tmp_path):
    out, res = run_tiny(tmp_path, "speedrun", "--recipe", "muon", "--batch-size", "25", "--epochs", "2", "--runs",
                        "1", "--val-size", "0")
    assert res["recipe"] == "muon" and res["config"]["optimizer"] == "muon" and res["config"]["muon_ns_steps"] == 3
    assert res["runs"][0]["train_seconds"] > 0 and "airbench94_muon" in (out / "report.md").read_text()
    # Without --batch-size the recipe's own batch (2000) applies: too large for 120 images, said in one line.
    bad = run("--data", str(tmp_path / "tiny.zip"), "--cache-dir", str(tmp_path / "cache"), "--out",
              str(tmp_path / "o2"), "--recipe", "muon", "--epochs", "1", "--runs", "1", experiment="speedrun")
    assert bad.returncode == 2 and "batch size 2000" in bad.stderr and bad.stderr.strip().count("\n") == 0
    unknown = run("--recipe", "lion", experiment="speedrun")
    assert unknown.returncode == 2 and "invalid choice: 'lion'" in unknown.stderr


@pytest.mark.parametrize("quick", [False, True])
def test_quick_defaults_follow_each_experiment(quick):
    """``--quick`` picks the experiment's quick epochs/batch/validation size; explicit values win."""
    from jaxcifar import cli

    flags = ["--quick"] if quick else []
    sweep = cli.parse(cli.common_parser("x", epochs=20, batch_size=32, out="o"), flags)
    speed = cli.parse(cli.common_parser("x", epochs=10, batch_size=1024, out="o", quick_batch_size=256,
                                        val_size=0, quick_val_size=0), flags)
    assert (sweep.epochs, sweep.batch_size, sweep.val_size) == ((3, 32, 500) if quick else (20, 32, 1000))
    assert (speed.epochs, speed.batch_size, speed.val_size) == ((3, 256, 0) if quick else (10, 1024, 0))
    explicit = cli.parse(cli.common_parser("x", epochs=20, batch_size=32, out="o"),
                         [*flags, "--epochs", "7", "--batch-size", "64", "--val-size", "0.1"])
    assert (explicit.epochs, explicit.batch_size, explicit.val_size) == (7, 64, 0.1)


def test_set_overrides_any_config_field():
    from argparse import Namespace

    from jaxcifar import configs
    from jaxcifar.cli import overridden
    from jaxcifar.errors import ConfigError

    base = configs.baseline()
    augment = 'augment=["flip", ["crop", {"padding": 4}]]'
    args = Namespace(set=["learning_rate=0.01", "model_kwargs.dense=[256]", augment, "optimizer=adamw",
                          "nesterov=true"])
    cfg = overridden(base, args)
    assert (cfg.learning_rate, cfg.optimizer, cfg.nesterov) == (0.01, "adamw", True)
    assert cfg.model_kwargs == {**base.model_kwargs, "dense": [256]}  # one option set, the others kept
    assert cfg.augment == ("flip", ("crop", {"padding": 4}))
    assert overridden(base, Namespace(set=[])) == base
    for bad, match in (("learnig_rate=1", "no such config field"), ("learning_rate", "write FIELD=VALUE"),
                       ("learning_rate=-1", "learning rate -1 must be > 0"), ("epochs.x=1", "no such config field"),
                       ("optimizer=lamb", "unknown optimizer")):
        with pytest.raises(ConfigError, match=match):
            overridden(base, Namespace(set=[bad]))


def test_set_reaches_the_experiment_and_bad_values_are_one_line(tmp_path):
    out, res = run_tiny(tmp_path, "baseline", "--batch-size", "25", "--epochs", "1", "--set", "learning_rate=0.002",
                        "--set", "model_kwargs.dense=[64]")
    assert res["config"]["learning_rate"] == 0.002 and res["config"]["model_kwargs"]["dense"] == [64]
    bad = run("--data", str(tmp_path / "tiny.zip"), "--cache-dir", str(tmp_path / "cache"), "--out",
              str(tmp_path / "o2"), "--set", "dropout_rate=1.5", experiment="baseline")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "dropout rate 1.5" in bad.stderr
