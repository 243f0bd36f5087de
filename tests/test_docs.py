"""Every code block of README.md and docs/ runs somewhere, and the documentation points only inside the repository.

A fenced block is either executed by the docs build (markdown-exec: `exec="on"`, and `make docs` is strict, so a
failing block fails the build), executed here (the README's Python blocks, whose printed output must equal the
`text` block that follows them), or preceded by an HTML comment `<!-- not run...: reason -->` saying why not.
"""

import contextlib
import dataclasses
import io
import re
from pathlib import Path

import pytest

import jaxdiff as jd

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted((REPO / "docs").rglob("*.md"))
pytestmark = [
    pytest.mark.docs,
    pytest.mark.skipif(not (REPO / "mkdocs.yml").is_file(), reason="needs the source tree (README.md, docs/)"),
]

FENCE = re.compile(r"^```(\S*)(.*)$")
NOT_RUN = re.compile(r"^<!-- not run[^:]*: .{10,} -->$")


@dataclasses.dataclass
class Block:
    path: Path
    line: int
    lang: str
    options: str
    code: str
    comment: str  # the non-blank line before the fence


def blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i].strip())
        if m and lines[i].startswith("```"):
            start, j = i, i + 1
            while not lines[j].startswith("```"):
                j += 1
            before = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            out.append(Block(path, start + 1, m.group(1), m.group(2), "\n".join(lines[start + 1 : j]), before))
            i = j + 1
        else:
            i += 1
    return out


def test_docs_and_readme_exist():
    assert (REPO / "README.md").is_file() and len(PAGES) >= 15, PAGES


@pytest.mark.parametrize("path", [REPO / "README.md", *PAGES], ids=lambda p: str(p.relative_to(REPO)))
def test_every_code_block_runs_or_says_why_not(path):
    unaccounted = []
    for b in blocks(path):
        executed_by_build = 'exec="on"' in b.options and path != REPO / "README.md"
        executed_here = path == REPO / "README.md" and b.lang == "python"
        output_of_previous = b.lang == "text" and b.comment == "<!-- output of the block above -->"
        if not (executed_by_build or executed_here or output_of_previous or NOT_RUN.match(b.comment)):
            unaccounted.append(f"{path.relative_to(REPO)}:{b.line} ```{b.lang}")
    assert not unaccounted, "blocks neither executed nor marked '<!-- not run: why -->': " + ", ".join(unaccounted)


def test_readme_python_runs_and_prints_what_it_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    readme = blocks(REPO / "README.md")
    python = [(i, b) for i, b in enumerate(readme) if b.lang == "python"]
    assert python
    for i, b in python:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(b.code, f"README.md:{b.line}", "exec"), {"__name__": "__readme__"})
        nxt = readme[i + 1] if i + 1 < len(readme) else None
        if nxt is not None and nxt.lang == "text" and nxt.comment == "<!-- output of the block above -->":
            assert out.getvalue().strip() == nxt.code.strip(), f"README.md:{nxt.line} shows another output"


OUTSIDE = re.compile(r"\.\./shared|shared/data|shared/design|/work/|\.\./\.\./")


@pytest.mark.parametrize(
    "path",
    [REPO / "README.md", REPO / "mkdocs.yml", *PAGES, *sorted((REPO / "notebooks").glob("*.ipynb"))],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_no_path_outside_the_repository(path):
    hits = [f"{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, hits


def test_readme_links_resolve_inside_the_repository():
    text = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)", text)
    assert "docs/index.md" in links  # the documentation
    for link in links:
        if not link.startswith("http"):
            assert (REPO / link).resolve().is_relative_to(REPO) and (REPO / link).exists(), link


def test_every_config_field_is_documented():
    for field in dataclasses.fields(jd.SubtractConfig):
        assert set(field.metadata) == {"lsst", "doc"}, field.name
        assert len(field.metadata["doc"]) > 15 and field.metadata["doc"].endswith("."), field.name


def test_nav_lists_every_page():
    nav = (REPO / "mkdocs.yml").read_text()
    for page in PAGES:
        assert str(page.relative_to(REPO / "docs")) in nav, page


PRIVATE = re.compile(r"\bjaxdiff\._[a-z]|\bjd\._[a-z]|from jaxdiff import _")


def test_examples_use_public_names_only():
    """What users copy from (README, docs, notebooks, benchmarks) reaches jaxdiff through public names only."""
    files = [REPO / "README.md", *PAGES, *(REPO / "notebooks").glob("*.ipynb"), REPO / "notebooks" / "build.py"]
    files += sorted((REPO / "benchmarks").glob("*.py"))
    offenders = [
        f"{path.relative_to(REPO)}:{i}: {line.strip()}"
        for path in files
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line)
    ]
    assert not offenders, offenders
