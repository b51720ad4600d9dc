"""The documentation refers only to what exists: links and repository paths in the Markdown pages, and
repository paths in Python docstrings and comments and in YAML comments, name files of this repository;
nothing points outside it or at an issue tracker; README.md stays a front page."""

import ast
import io
import itertools
import re
import sys
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Folders that hold outputs or tool state, never documentation (train.py writes runs under trained_models/).
SKIP_DIRS = {"__pycache__", "runs", "trained_models", "analysis_plots"}
README_MAX_LINES = 300


def repo_files(suffix):
    """Files with this suffix, outside hidden and output folders."""
    found = []
    for path in sorted(REPO.rglob(f"*{suffix}")):
        parts = path.relative_to(REPO).parts[:-1]
        if any(p.startswith(".") or p in SKIP_DIRS or p.endswith(".egg-info") for p in parts):
            continue
        found.append(path)
    return found


MARKDOWN = repo_files(".md")
PYTHON = [p for p in repo_files(".py") if p != Path(__file__).resolve()]  # this file names what it forbids
YAML = repo_files(".yaml") + repo_files(".yml")

# [text](target) or [text](target "title"); images too.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A relative path of at least two parts, e.g. models/neurons.py, docs/design.md, configs/, tests/x/:
# not preceded by a word character, '/', '.', '-', '~' or '$' (so /data/VOC, ../x, ~/x and $OUT/x are not
# candidates) and not a URL. Whether it is a repository path is decided by its first part.
_PART = r"(?:[\w.\-*<>]|\{[^{}\s/]*\})"  # a path character, or a {a,b} alternative
PATH = re.compile(rf"(?<![\w/.\-~$])((?:{_PART}+/)+{_PART}*)")
ISSUE_REF = re.compile(r"\bissues?\s*#?\s*\d+|\bissues/\d+", re.IGNORECASE)
OUTSIDE_DESIGN = re.compile(r"\bDESIGN\b")  # the design document is docs/design.md, spelled so
SHARED = re.compile(r"\.\./shared\b")
# Unreplaced placeholders: TODO-style markers, and ALL-CAPS words joined by underscores (RESULTS_SECTION),
# outside code (inline code and fenced blocks hold environment variables such as `OMP_NUM_THREADS`).
PLACEHOLDER = re.compile(r"\b(?:TODO|TBD|FIXME|XXX)\b|\b[A-Z][A-Z0-9]+(?:_[A-Z0-9]+)+\b")


def top_level_dirs():
    return {p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in SKIP_DIRS}


def expand_braces(text):
    """'configs/{a,b}-x.yaml' -> ['configs/a-x.yaml', 'configs/b-x.yaml'] (shell brace expansion, unnested)."""
    parts = re.split(r"\{([^{}]*)\}", text)
    choices = [[part] if i % 2 == 0 else part.split(",") for i, part in enumerate(parts)]
    return ["".join(combo) for combo in itertools.product(*choices)]


def path_exists(candidate):
    """Whether a repository path (possibly with {a,b} alternatives or a * glob) names something here."""
    for path in expand_braces(candidate):
        if "*" in path:
            if not list(REPO.glob(path)):
                return False
        elif not (REPO / path).exists():
            return False
    return True


def repo_path_mentions(text, dirs):
    """The candidates in `text` that are meant as repository paths: their first part is a top-level folder
    of the repository. Placeholders (<name>, ...) are not paths to check."""
    found = []
    for match in PATH.finditer(text):
        candidate = match.group(1).rstrip(".")  # a full stop after a path is the sentence's
        if "<" in candidate or ">" in candidate or "..." in candidate:
            continue
        first = candidate.split("/")[0]
        if first in dirs:
            found.append(candidate)
    return found


def python_prose(path):
    """Docstrings and comments of a Python file, as (line, text)."""
    source = path.read_text(encoding="utf-8")
    prose = [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                prose.append((body[0].lineno, body[0].value.value))
    return prose


def yaml_comments(path):
    return [
        (i, line)
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if line.lstrip().startswith("#")
    ]


def markdown_prose(path):
    return list(enumerate(path.read_text(encoding="utf-8").splitlines(), 1))


def all_prose():
    for path in MARKDOWN:
        yield path, markdown_prose(path)
    for path in PYTHON:
        yield path, python_prose(path)
    for path in YAML:
        yield path, yaml_comments(path)


def prose_outside_code(markdown_text):
    """(line number, text) of a Markdown page without fenced code blocks and inline code spans (which may
    run over a line break)."""
    kept, fenced = [], False
    for line in markdown_text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            kept.append("")
            continue
        kept.append("" if fenced else line)
    text = re.sub(r"`[^`]*`", lambda span: "\n" * span.group(0).count("\n"), "\n".join(kept))
    return list(enumerate(text.split("\n"), 1))


def placeholders(markdown_text):
    """'line: word' for each unreplaced placeholder in the prose of a Markdown page."""
    return [f"{n}: {m.group(0)}" for n, text in prose_outside_code(markdown_text) for m in PLACEHOLDER.finditer(text)]


def github_anchors(markdown_text):
    """The anchors GitHub gives the headings of a page: lower case, punctuation dropped, spaces -> '-',
    '-1', '-2' ... for repeats. Fenced code blocks hold no headings."""
    anchors, seen, fenced = set(), {}, False
    for line in markdown_text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


# ---------------------------------------------------------------------------------------------- the checks
def test_the_scan_sees_the_documentation():
    # If the file discovery broke, every other test here would pass vacuously.
    names = {p.relative_to(REPO).as_posix() for p in MARKDOWN}
    assert {"README.md", "docs/design.md"} <= names
    assert REPO / "train.py" in PYTHON and REPO / "configs" / "quickstart.yaml" in YAML


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.relative_to(REPO).as_posix())
def test_markdown_links_resolve_inside_the_repository(path):
    text = path.read_text(encoding="utf-8")
    broken = []
    for match in LINK.finditer(text):
        target = match.group(1)
        if re.match(r"[a-z][a-z0-9+.\-]*:", target, re.IGNORECASE):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if REPO != resolved and REPO not in resolved.parents:
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in github_anchors(resolved.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{path.relative_to(REPO)}: " + "; ".join(broken)


def test_repository_paths_in_docs_docstrings_and_comments_exist():
    dirs = top_level_dirs()
    missing = []
    for path, prose in all_prose():
        for line, text in prose:
            missing += [
                f"{path.relative_to(REPO)}:{line}: {candidate}"
                for candidate in repo_path_mentions(text, dirs)
                if not path_exists(candidate)
            ]
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)


def test_no_issue_numbers_design_file_elsewhere_or_outside_files():
    found = []
    for path, prose in all_prose():
        for line, text in prose:
            for pattern, what in (
                (ISSUE_REF, "issue reference"),
                (OUTSIDE_DESIGN, "design file not as docs/design.md"),
                (SHARED, "file outside the repository"),
            ):
                found += [f"{path.relative_to(REPO)}:{line}: {what}: {m.group(0)!r}" for m in pattern.finditer(text)]
    assert not found, "\n".join(found)


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; depth belongs in docs/"
    # The two fresh-machine commands come first: install + quickstart, install + the tests (as CI runs them).
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    test_command = (
        "pip install -r requirements-test.txt && pip install --no-deps -r requirements-peers.txt && "
        "python -m pytest -q -n 2 tests"
    )
    assert test_command in ci
    first_block = "\n".join(lines[:20])
    assert "pip install -r requirements.txt && python train.py" in first_block and test_command in first_block


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_page_has_unreplaced_placeholders(path):
    # Every page, README.md and docs/ alike. Links and anchors (README.md's own #results included) are
    # checked by test_markdown_links_resolve_inside_the_repository.
    found = placeholders(path.read_text(encoding="utf-8"))
    assert not found, f"{path.relative_to(REPO)} holds placeholders: " + "; ".join(found)


# ------------------------------------------------------------------------------- the helpers themselves
def test_placeholder_detection():
    text = (
        "## Results\n\nRESULTS_SECTION\n\nTODO: measure\n"
        "`OMP_NUM_THREADS=1` and `SUITE_BUDGET_S` are code, so is `A_SPAN\nOVER_TWO_LINES`\n```\nFIXME_LATER = 1\n```\n"
        "an mIoU of 0.65, VOC2012, DDD17, BNTT, LIF, CUDA and (to be measured) are not placeholders\n"
    )
    assert placeholders(text) == ["3: RESULTS_SECTION", "5: TODO"]
    assert placeholders("ok\nLEFT_OVER after `code`") == ["2: LEFT_OVER"]


def test_links_to_missing_anchors_and_files_are_found(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("# Title\n## Results\n[ok](#results) [gone](#performance) [no file](missing.md)\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    with pytest.raises(AssertionError) as failure:
        test_markdown_links_resolve_inside_the_repository(page)
    message = str(failure.value)
    assert "#performance (no heading with that anchor)" in message and "missing.md (no such file)" in message
    assert "#results" not in message.replace("#performance", "")


def test_path_detection_finds_repository_paths_and_ignores_the_rest():
    dirs = {"models", "docs", "configs", "data"}
    text = (
        "see models/neurons.py, docs/design.md#2-neuron and configs/{a,b}.yaml; not /data/VOC, "
        "not ../shared/x.md, not trained_models/<name>/best.pth, not https://github.com/models/x.py, "
        "not data.datalists, not ~/data/x, not $OUT/data/x, not configs/<name>.yaml"
    )
    assert repo_path_mentions(text, dirs) == ["models/neurons.py", "docs/design.md", "configs/{a,b}.yaml"]
    assert repo_path_mentions("ends a sentence: docs/data.md. And a folder: configs/.", dirs) == [
        "docs/data.md",
        "configs/",
    ]


def test_path_exists_expands_braces_and_globs():
    assert path_exists("configs/quickstart{,-ann}.yaml")
    assert not path_exists("configs/quickstart{,-missing}.yaml")
    assert path_exists("configs/voc2012-*.yaml") and not path_exists("configs/nothing-*.yaml")
    assert path_exists("models/neurons/lif.py") and not path_exists("models/neuron.py")


def test_github_anchors():
    text = (
        "# Quick start (fresh machine)\n## Training: `train.py`\n```\n# not a heading\n```\n## Training: `train.py`\n"
    )
    assert github_anchors(text) == {"quick-start-fresh-machine", "training-trainpy", "training-trainpy-1"}


def test_forbidden_patterns():
    assert ISSUE_REF.search("as Issue 7 asks") and ISSUE_REF.search("see issue #12") and ISSUE_REF.search("issues/3")
    assert not ISSUE_REF.search("a known issue with 2 processes")
    assert OUTSIDE_DESIGN.search("DESIGN" + ".md section 3") and not OUTSIDE_DESIGN.search("docs/design.md")


def front_page_text():
    """README.md and the pages of docs/ it links to: where a user looks for what exists."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    pages = {m.group(1).partition("#")[0] for m in LINK.finditer(readme)}
    linked = [REPO / p for p in sorted(pages) if p.startswith("docs/") and (REPO / p).is_file()]
    return "\n".join([readme] + [p.read_text(encoding="utf-8") for p in linked])


def test_front_page_lists_every_dataset_architecture_neuron_and_config():
    import data  # noqa: F401  (the datasets register on import)
    from data.registry import DATASETS
    from models import ARCHITECTURES, NEURONS

    text = front_page_text()
    named = set(re.findall(r"`([^`\s]+)`", text))
    missing = [f"dataset {n}" for n in DATASETS if n not in named]
    missing += [f"architecture {n}" for n in ARCHITECTURES if n not in named]
    missing += [f"neuron {n}" for n in NEURONS if n not in named]
    paths = {p for candidate in re.findall(r"configs/[\w.\-{},*]+", text) for p in expand_braces(candidate)}
    missing += [
        f"configs/{p.name}" for p in sorted((REPO / "configs").glob("*.y*ml")) if f"configs/{p.name}" not in paths
    ]
    assert not missing, "not on README.md or a docs page it links: " + ", ".join(missing)
