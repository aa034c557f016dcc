"""The project explains itself with files it has: every markdown file a project file cites exists in the
repository, and every `<page>.md#<anchor>` citation names a heading of that page.

A citation is any `<name>.md` or `<dir>/<name>.md` token in the prose of a project file, resolved against the
repository root or the citing file's folder: every line of a `.md`, `.toml` or `.sh` file or a Makefile, and
the comments and docstrings of a `.py` file (its other string literals are data, such as the names of the files
a script writes). Web addresses are not citations.
"""

from __future__ import annotations

import functools
import io
import os
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("docs/method.md", "docs/architecture.md")
SUFFIXES = {".py", ".md", ".toml", ".sh"}
NAMES = {"Makefile"}
# Folders that are not the project's own text: environments, caches, build and run outputs (see .gitignore;
# `obsdiff/runs/` is the subpackage, not output).
SKIP_DIRS = {"__pycache__", "runs", "build", "dist", "tmp", "gpu_check_out", "wheels"}
CITATION = re.compile(r"(?<![\w./-])([\w.][\w./-]*\.md)(?:#([\w-]+))?(?![\w/])")
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
HTML_ANCHOR = re.compile(r"""<a\s+(?:name|id)=["']([^"']+)["']""")
FENCE = re.compile(r"^ {0,3}(```|~~~)")


def project_files(root: Path = ROOT) -> list[Path]:
    """The files whose citations are checked, in a stable order."""
    found = []
    for folder, dirs, files in os.walk(root):
        # pruned in place, so walking never enters .venv or .git
        dirs[:] = [d for d in dirs if not (d.startswith(".") or d in SKIP_DIRS or d.endswith(".egg-info"))
                   or Path(folder, d) == root / "obsdiff" / "runs"]  # the obsdiff.runs subpackage is source
        found += [Path(folder, f) for f in files if Path(f).suffix in SUFFIXES or f in NAMES]
    return sorted(found)


def prose(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the parts of `path` that may cite a file: every line, or for Python source its
    comments and its docstrings (string literals that are a whole statement)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".py":
        return list(enumerate(text.splitlines(), 1))
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):  # not valid Python: read it all
        return list(enumerate(text.splitlines(), 1))
    out = [(tok.start[0], tok.string) for tok in tokens if tok.type == tokenize.COMMENT]
    code = [tok for tok in tokens if tok.type not in (tokenize.NL, tokenize.COMMENT)]
    starts, ends = {tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}, {tokenize.NEWLINE, tokenize.ENDMARKER}
    for i, tok in enumerate(code):
        if tok.type == tokenize.STRING and (i == 0 or code[i - 1].type in starts) \
                and (i + 1 == len(code) or code[i + 1].type in ends):
            out += [(tok.start[0] + k, line) for k, line in enumerate(tok.string.splitlines())]
    return sorted(out)


@functools.cache  # three tests read the whole repository
def citations(path: Path) -> list[tuple[int, str, str | None]]:
    """(line number, cited path, anchor or None) for every markdown citation in `path`."""
    out = []
    for number, line in prose(path):
        for match in CITATION.finditer(URL.sub(" ", line)):
            out.append((number, match[1], match[2]))
    return out


def resolve(cited: str, citing: Path, root: Path = ROOT) -> Path | None:
    """The repository file a citation means: relative to the root, else to the citing file's folder."""
    for base in (root, citing.parent):
        candidate = (base / cited).resolve()
        if candidate.is_file() and candidate.is_relative_to(root):
            return candidate
    return None


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a markdown page defines: its headings' slugs (repeats numbered as GitHub does) and HTML
    anchors. Lines inside fenced code blocks are not headings."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        found.update(HTML_ANCHOR.findall(line))
        heading = HEADING.match(line)
        if heading:
            base = slug(heading[2])
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_citations(root: Path = ROOT) -> tuple[list[str], list[str]]:
    """(missing files, missing anchors), each entry `citing file:line: citation`."""
    missing, unanchored = [], []
    cache: dict[Path, set[str]] = {}
    for path in project_files(root):
        where = path.relative_to(root)
        for number, cited, anchor in citations(path):
            target = resolve(cited, path, root)
            if target is None:
                missing.append(f"{where}:{number}: {cited}")
            elif anchor is not None:
                if target not in cache:
                    cache[target] = anchors(target)
                if anchor not in cache[target]:
                    unanchored.append(f"{where}:{number}: {cited}#{anchor}")
    return missing, unanchored


# ------------------------------------------------------------------------------------------ the repository


@pytest.mark.parametrize("page", DOCS)
def test_the_documentation_pages_exist_and_the_readme_links_them(page):
    path = ROOT / page
    assert path.is_file(), f"{page} is missing"
    assert len(anchors(path)) >= 8, f"{page} has too few sections to be cited"
    assert page in (ROOT / "README.md").read_text(encoding="utf-8"), f"README.md does not link {page}"


def test_every_cited_markdown_file_exists():
    missing, _ = broken_citations()
    assert missing == [], "cited markdown files that the repository does not have: " + "; ".join(missing)


def test_every_cited_anchor_is_a_heading():
    _, unanchored = broken_citations()
    assert unanchored == [], "cited anchors that are no heading of their page: " + "; ".join(unanchored)


def test_the_code_cites_the_method_page():
    cited = {anchor for path in project_files() if path.suffix == ".py"
             for _, target, anchor in citations(path) if target == "docs/method.md" and anchor}
    assert len(cited) >= 5, f"the code cites only these sections of docs/method.md: {sorted(cited)}"


# ------------------------------------------------------------------------------------------ the checker itself

MD = ".md"  # the examples below build their citations, so this file cites nothing that does not exist


def test_slugs_follow_github():
    assert slug("Calibration modes (`python bench/calibration_modes.py`)") == \
        "calibration-modes-python-benchcalibration_modespy"
    assert slug("N:M along the input dimension") == "nm-along-the-input-dimension"
    assert slug("Hub models, portable runs and plain diffusers folders") == \
        "hub-models-portable-runs-and-plain-diffusers-folders"
    assert slug("See [the page](other.html) now") == "see-the-page-now"


def test_the_checker_finds_missing_files_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / f"page{MD}").write_text(
        '# Title\n\n## A section\n\n## A section\n\n```\n# not a heading\n```\n<a id="custom"></a>\n')
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        f'"""See docs/page{MD}#a-section and docs/page{MD}#a-section-1, docs/page{MD}#custom."""\n'
        f"# also GONE{MD}, docs/page{MD}#not-a-heading and docs/page{MD}#nowhere\n"
        f"# https://example.org/REMOTE{MD} is a web address\n"
        f'OUT = "report{MD}"  # data, not a citation\n'
        f'def f():\n    """Writes OUT, not LOST{MD}."""\n    return open(f"x{MD}")\n')
    (tmp_path / "pkg" / f"near{MD}").write_text(f"[up](../docs/page{MD}#title) and [here](near{MD})\n")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "x.py").write_text(f"# VENDORED{MD}\n")
    missing, unanchored = broken_citations(tmp_path)
    assert missing == [f"pkg/mod.py:2: GONE{MD}", f"pkg/mod.py:6: LOST{MD}"]
    assert unanchored == [f"pkg/mod.py:2: docs/page{MD}#not-a-heading", f"pkg/mod.py:2: docs/page{MD}#nowhere"]
