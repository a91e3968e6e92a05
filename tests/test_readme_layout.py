"""README.md's Layout table against the tree: every module of the package is named there, and every path
the table names exists, so a reader finds each file by its job and no row describes a file that is gone.

A row's first path is relative to the repository; a further bare name in the same cell (``benchmark.py``)
is relative to that path's folder (a further folder, ``tests/``, to the repository), and a module quoted
in the description of a row naming one folder (``timm_cskd/train/`` ... ``loop.py``) is relative to it.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "timm_cskd"


def layout_rows(readme: str) -> list[tuple[str, str]]:
    """The (path cell, description cell) of each row of the section ``## Layout``."""
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0] not in ("path", "") and not set(cells[0]) <= {"-"}:
            rows.append((cells[0], "|".join(cells[1:])))
    return rows


def named_paths(rows: list[tuple[str, str]]) -> set[str]:
    """Every repository-relative path the table names."""
    named = set()
    for path_cell, description in rows:
        paths = re.findall(r"`([^`]+)`", path_cell)
        if not paths:
            continue
        first = paths[0]
        folder = first if first.endswith("/") else first.rsplit("/", 1)[0] + "/" if "/" in first else ""
        named.add(first.rstrip("/"))
        named.update((p if "/" in p else folder + p).rstrip("/") for p in paths[1:])
        if first.endswith("/") and len(paths) == 1:
            named.update(folder + p for p in re.findall(r"`([\w/]+\.py)`", description))
    return named


def package_files() -> set[str]:
    """The package's modules, repository-relative (``__init__``/``__main__`` belong to their folder's row)."""
    return {
        p.relative_to(ROOT).as_posix()
        for p in PACKAGE.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }


def test_every_module_is_in_the_layout_table():
    named = named_paths(layout_rows((ROOT / "README.md").read_text(encoding="utf-8")))
    missing = sorted(f for f in package_files() if f not in named)
    assert not missing, f"README.md's Layout table does not name: {missing}"


def test_every_path_in_the_layout_table_exists():
    named = named_paths(layout_rows((ROOT / "README.md").read_text(encoding="utf-8")))
    gone = sorted(p for p in named if not (ROOT / p).exists())
    assert not gone, f"README.md's Layout table names paths that do not exist: {gone}"


def test_the_reader_finds_a_missing_and_a_stale_row():
    """The two checks above on a made-up table: a module it omits and a row whose file is gone."""
    readme = (
        "x\n## Layout\n\n| path | what |\n|---|---|\n"
        "| `timm_cskd/train/` | the trainer: `loop.py` the loop, `gone.py` |\n"
        "| `timm_cskd/loss.py`, `sampler.py` | loss, sampler |\n## Next\n| `timm_cskd/x.py` | no |\n"
    )
    named = named_paths(layout_rows(readme))
    assert named == {
        "timm_cskd/train",
        "timm_cskd/train/loop.py",
        "timm_cskd/train/gone.py",
        "timm_cskd/loss.py",
        "timm_cskd/sampler.py",
    }
    assert "timm_cskd/train/state.py" in package_files() - named
    assert not (ROOT / "timm_cskd/train/gone.py").exists()
