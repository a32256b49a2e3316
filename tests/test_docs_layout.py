"""The README's Layout and docs/ARCHITECTURE.md name every module of the package, so a newcomer
can place each file (a module added without a line there fails here)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules() -> set[str]:
    """Every module as its package-relative name without .py: `cli`, `train/__main__`, `data/records`."""
    found = set()
    for path in (ROOT / "simone").rglob("*.py"):
        rel = path.relative_to(ROOT / "simone").with_suffix("").as_posix()
        if not rel.endswith("__init__") or rel == "__init__":
            found.add(rel)
    return found - {"__init__"}


def layout_block(text: str) -> str:
    start = text.index("## Layout")
    return text[start : text.index("```", text.index("```", start) + 3)]


def named(block: str, module: str) -> bool:
    """`data/records` is named as `records` on the `simone/data/` line or after it; a top-level module
    as `name.py`."""
    folder, _, stem = module.rpartition("/")
    if not folder:
        return re.search(rf"\b{re.escape(stem)}\.py\b", block) is not None
    part = block[block.index(f"simone/{folder}/") :]
    nxt = re.search(r"\nsimone/", part[1:])
    part = part[: nxt.start() + 1] if nxt else part
    return re.search(rf"(?<![\w/]){re.escape(stem)}\b", part) is not None


def test_the_readme_layout_names_every_module():
    block = layout_block((ROOT / "README.md").read_text(encoding="utf-8"))
    assert sorted(m for m in modules() if not named(block, m)) == []


def test_the_architecture_layout_names_every_module():
    block = layout_block((ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8"))
    assert sorted(m for m in modules() if not named(block, m)) == []
