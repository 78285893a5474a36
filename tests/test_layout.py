"""The package layout: the top level holds only command modules, and packages import along the pipeline."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

from vall_e.cli import SUBCOMMANDS

PACKAGE = Path(__file__).resolve().parents[1] / "vall_e"
# the pipeline order of docs/architecture.md: a package may import only packages before it
ORDER = ["utils", "config", "text", "codecs", "emb", "data", "models", "generation", "training", "serving",
         "evaluation", "demo"]
COMMAND_MODULES = {"__init__.py", "__main__.py", "cli.py", "train.py", "export.py", "plot.py", "server.py",
                   "webui.py", "eval.py", "convert.py"}


def _imported_packages(path: Path) -> set[str]:
    """The `vall_e` subpackages (first name after `vall_e.`) that a file imports."""
    modules = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.append(node.module)
    return {m.split(".")[1] for m in modules if m.startswith("vall_e.")}


def test_top_level_holds_only_command_modules_and_packages_are_the_pipeline():
    assert {p.name for p in PACKAGE.glob("*.py")} == COMMAND_MODULES
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(ORDER)


def test_packages_import_only_earlier_packages():
    wrong = []
    for pkg in ORDER:
        for path in (PACKAGE / pkg).rglob("*.py"):
            later = {p for p in _imported_packages(path) if p in ORDER and ORDER.index(p) > ORDER.index(pkg)}
            wrong += [f"{path.relative_to(PACKAGE)} imports vall_e.{p}" for p in sorted(later)]
    assert not wrong, wrong


def test_command_modules_are_thin_and_every_subcommand_has_a_main():
    for name in COMMAND_MODULES - {"__init__.py", "cli.py"}:
        text = (PACKAGE / name).read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 12 and " import main" in text, f"{name}: should only import and run a main"
    for name, (module, _) in SUBCOMMANDS.items():
        assert callable(getattr(importlib.import_module(module), "main", None)), name
