"""Imports run one way: import-linter's contracts in .importlinter hold, and they cover every module."""

import configparser
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def contract_modules():
    parser = configparser.ConfigParser()
    parser.read(REPO / ".importlinter")
    layers = parser["importlinter:contract:layers"]["layers"]
    return set(re.findall(r"[A-Za-z_][\w.]*", layers))


def test_import_linter_contracts_are_kept():
    command = Path(sys.executable).with_name("lint-imports")  # import-linter's console script
    result = subprocess.run(
        [str(command), "--config", str(REPO / ".importlinter")], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_every_helper_module_has_a_layer():
    """A new helper module must be placed above models and data (utils/) or below them (common/), not left out."""
    placed = contract_modules()
    modules = {f"{d}.{p.stem}" for d in ("utils", "common") for p in (REPO / d).glob("*.py") if p.stem != "__init__"}
    assert modules - placed == set(), "add these modules to a layer in .importlinter"
    assert {"models", "data"} <= placed


def test_no_function_level_imports_of_project_modules():
    """No import inside a function to dodge a cycle: the project's own modules are imported at the top.
    Third-party packages may be imported where they are needed, and so may a module that needs an optional
    package (the Triton backend), under ``try:``."""
    project = ("data", "models", "utils", "common", "setup")
    offenders = []
    for folder in ("data", "models", "utils", "common"):
        for path in (REPO / folder).rglob("*.py"):
            lines = path.read_text().splitlines()
            for number, line in enumerate(lines, 1):
                match = re.match(r"^\s+(?:from|import) (\.?[\w.]*)", line)
                guarded = number > 1 and lines[number - 2].strip() == "try:"
                if (
                    match
                    and not guarded
                    and (match.group(1).startswith(".") or match.group(1).split(".")[0] in project)
                ):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []
