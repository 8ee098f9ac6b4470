"""The documentation's code runs as written: docs/research.md's Python blocks, in order, in one namespace."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from jaxcifar.data.synthetic import synthetic_cifar

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(path: Path) -> list[str]:
    """The fenced ```python blocks of a Markdown file, in order."""
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


def test_research_walkthrough_runs_as_written(tmp_path, monkeypatch):
    """Every block of docs/research.md, on generated CIFAR-10-shaped data of the size the page loads (no
    dataset download in the test suite), in a scratch directory."""
    import jaxcifar.data

    blocks = python_blocks(DOCS / "research.md")
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(jaxcifar.data, "load_cifar", lambda name, *a, **k: synthetic_cifar(1200, 300, seed=0))
    module = types.ModuleType("research_md")  # a real module, as a notebook's __main__ (Flax looks classes up)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"docs/research.md block {i}", "exec"), namespace)
        except Exception as e:  # name the block that broke
            pytest.fail(f"docs/research.md block {i} failed: {type(e).__name__}: {e}\n{block}")
    assert (tmp_path / "runs" / "research" / "metrics.jsonl").is_file()
    assert list((tmp_path / "runs" / "research" / "tensorboard" / "run_000").glob("events.out.tfevents.*"))
    assert namespace["result"].summary["test_accuracy"] > 0.2  # it learned (10 classes: chance is 0.1)
    assert (tmp_path / "runs" / "robustness" / "variant1_reliability.png").stat().st_size > 0  # per learning rate
