"""The layering contract of pyproject.toml ([tool.importlinter]) holds: layers point one way
(cli > eval > train > model > kernels), no import cycle anywhere, no torch in the metrics."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The subpackages that pyproject.toml's package-dir maps from top-level folders of the repository.
SUBPACKAGES = ("train", "eval")


def _source_dir(package: str) -> Path:
    return Path(importlib.util.find_spec(package).submodule_search_locations[0])


def _not_python(folder: str, names: list[str]) -> list[str]:
    """``shutil.copytree``'s filter: skips all but Python files and folders (bar caches)."""
    return [n for n in names if n == "__pycache__" or not (n.endswith(".py") or Path(folder, n).is_dir())]


def installed_layout(target: Path) -> Path:
    """Copies the package's Python files into ``target`` in their installed layout
    (``moe_empathy/train/``, ...), which the import graph needs: in an editable install
    the subpackages live beside moe_empathy/, not in it.

    Args:
        target: a folder that does not exist yet.

    Returns:
        ``target``, to put first on ``PYTHONPATH``.
    """
    shutil.copytree(_source_dir("moe_empathy"), target / "moe_empathy", ignore=_not_python)
    for name in SUBPACKAGES:
        shutil.copytree(_source_dir(f"moe_empathy.{name}"), target / "moe_empathy" / name, ignore=_not_python, dirs_exist_ok=True)
    return target


def test_import_contracts_are_kept(tmp_path):
    layout = installed_layout(tmp_path / "layout")
    lint_imports = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(layout)}
    result = subprocess.run(
        [str(lint_imports), str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout
