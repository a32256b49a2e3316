"""The package's layering (docs/ARCHITECTURE.md), kept by import-linter contracts in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports not installed (pip install -e '.[test]')")
    return subprocess.run([exe, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_layers_hold():
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "broken" not in done.stdout.lower().replace("0 broken", "")


def test_a_forbidden_import_breaks_a_contract(tmp_path):
    """The check can fail: a copy of the package whose model imports the trainer is refused."""
    shutil.copytree(ROOT / "simone", tmp_path / "simone", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    layers = tmp_path / "simone" / "model" / "layers.py"
    layers.write_text(layers.read_text() + "\n\ndef _bad():\n    from simone.train import trainer  # noqa: F401\n")
    done = _lint_imports(tmp_path)
    assert done.returncode != 0
    assert "simone.model.layers -> simone.train" in done.stdout
