"""The main job end to end on generated data: outputs written, resumable, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import write_image_folder, zip_tree

ROOT = Path(__file__).resolve().parents[1]
CLASSES = tuple(f"c{i}" for i in range(10))


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "experiments.dropout_sweep", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_dropout_sweep_writes_report_and_resumes(tmp_path):
    src = tmp_path / "src"
    write_image_folder(src, {"train": 12, "test": 4}, classes=CLASSES)
    data = zip_tree(src, tmp_path / "tiny.zip")
    out = tmp_path / "out"
    common = ["--data", str(data), "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--val-size", "20",
              "--batch-size", "25", "--rates", "0", "0.5", "--no-progress"]
    first = run(*common, "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    for name in ("results.json", "report.md", "curves.png", "val_accuracy.png"):
        assert (out / name).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    assert [r["dropout_rate"] for r in res["runs"]] == [0.0, 0.5]
    assert res["meta"]["vmapped"] and res["meta"]["environment"]["packages"]["jax"]
    assert "Winner" in (out / "report.md").read_text()
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
    r = run("--data", str(tmp_path / "missing.zip"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
