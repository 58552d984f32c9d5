"""The repository explains itself: every reference in README.md, docs/ and the code resolves inside it.

Checked, over README.md and docs/*.md:
- every relative markdown link `[text](path)` / `[text](path#anchor)` points to an existing file or
  folder of the repository, and every `#anchor` to a heading of the target .md file (GitHub's slugs:
  lowercase, punctuation other than `-` and `_` dropped, spaces turned into `-`, `-1`, `-2`, ... for
  repeated headings);
- every repository path written in the text (`lokr_diffusers/functional/plan.py`, `tests/test_*.py`,
  `docs/formats.md`, `lokr_diffusers/formats/`; globs allowed) exists.
Checked over those and the .py files under lokr_diffusers/, tests/, examples/ and benchmarks/:
- every citation of a doc, in the one form used throughout: `docs/<name>.md` alone, or followed by
  `§<Heading>` with the exact text of a heading of that doc (several: `docs/formats.md §The math, §DoRA`),
  names an existing doc and existing headings;
- in .py files no `§` stands outside such a citation (no bare `§3`, no citation of a numbered section).
This file is left out of the scan over .py files: its self-test below holds deliberately bad examples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("lokr_diffusers", "tests", "examples", "benchmarks")
PATH_ROOTS = ("lokr_diffusers", "tests", "examples", "benchmarks", "docs")

FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)\)")
CODE_SPAN = re.compile(r"`[^`\n]*`")
REPO_PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(PATH_ROOTS) + r")/[\w./*-]*)")
DOC_CITE = re.compile(r"(?<![\w./-])docs/([\w-]+\.md)")
NEXT_SECTION = re.compile(r"(?:\s*,\s*|\s+and\s+|\s+)?§")


# ----------------------------------------------------------------------------------- markdown
def headings(text: str) -> list[str]:
    """The headings of a markdown text, outside fenced code blocks, as written."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := HEADING.match(line)):
            out.append(m.group(2))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading (before de-duplication)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in headings(text):
        s = slug(h)
        n = seen.get(s, 0)
        out.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    return out


def prose(text: str) -> str:
    """The text outside fenced code blocks (links are looked for there)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return "\n".join(lines)


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


@dataclass
class Docs:
    """The repository the checks run against (the real one, or a small fake in the self-test)."""

    root: Path

    def read(self, rel: str) -> str | None:
        p = self.root / rel
        return p.read_text(encoding="utf-8") if p.is_file() else None

    def exists(self, rel: str) -> bool:
        if "*" in rel:
            return any(self.root.glob(rel))
        return (self.root / rel).exists()

    def inside(self, p: Path) -> bool:
        try:
            p.resolve().relative_to(self.root.resolve())
        except ValueError:
            return False
        return True


def check_links(repo: Docs, md: str) -> list[str]:
    """Relative links of one .md file (path relative to the repo root): targets and anchors exist."""
    text = repo.read(md) or ""
    errors = []
    body = CODE_SPAN.sub(lambda m: " " * len(m.group()), prose(text))
    for m in LINK.finditer(body):
        target = m.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        where = f"{md}:{line_of(text, m.start())}"
        dest = (repo.root / md).parent / path if path else repo.root / md
        if not repo.inside(dest) or not dest.exists():
            errors.append(f"{where}: link to {target!r}: no such file in the repository")
            continue
        if anchor:
            if dest.suffix != ".md" or not dest.is_file():
                errors.append(f"{where}: link to {target!r}: an anchor needs a .md file")
            elif anchor not in anchors(dest.read_text(encoding="utf-8")):
                errors.append(f"{where}: link to {target!r}: no heading with anchor #{anchor} in {path or md}")
    return errors


def check_paths(repo: Docs, md: str) -> list[str]:
    """Repository paths written in one .md file (code blocks included) exist."""
    text = repo.read(md) or ""
    errors = []
    for m in REPO_PATH.finditer(text):
        path = m.group(1).rstrip(".")
        if not repo.exists(path):
            errors.append(f"{md}:{line_of(text, m.start())}: {path} does not exist")
    return errors


def check_citations(repo: Docs, rel: str, stray_sections: bool) -> list[str]:
    """`docs/<name>.md [§Heading[, §Heading...]]` citations of one file name existing docs and headings.
    With stray_sections, a `§` outside a citation is an error too."""
    text = repo.read(rel) or ""
    errors, used = [], set()
    for m in DOC_CITE.finditer(text):
        doc = m.group(1)
        where = f"{rel}:{line_of(text, m.start())}"
        target = repo.read(f"docs/{doc}")
        if target is None:
            errors.append(f"{where}: cites docs/{doc}, which does not exist")
            continue
        names = sorted(headings(target), key=len, reverse=True)  # the longest heading that fits
        pos = m.end()
        while nxt := NEXT_SECTION.match(text, pos):
            used.add(nxt.end() - 1)
            # a citation may wrap: a line break (and a comment's `#`) counts as one space
            rest = re.sub(r"\s*\n\s*(?:#\s*)?", " ", text[nxt.end():nxt.end() + 300])
            name = next((h for h in names if rest.startswith(h) and not rest[len(h):len(h) + 1].isalnum()), None)
            if name is None:
                errors.append(f"{where}: docs/{doc} §{rest[:40].splitlines()[0]!r}...: no such heading "
                              f"(headings: {headings(target)})")
                break
            pos = _advance(text, nxt.end(), name)
    if stray_sections:
        for i, ch in enumerate(text):
            if ch == "§" and i not in used:
                errors.append(f"{rel}:{line_of(text, i)}: '§' outside a docs/<name>.md §<Heading> citation")
    return errors


def _advance(text: str, start: int, name: str) -> int:
    """The position in `text` after the heading `name` that starts at `start` (wrapped lines allowed)."""
    i, j = start, 0
    while j < len(name) and i < len(text):
        if name[j] == " " and text[i] in " \n#\t":
            while i < len(text) and text[i] in " \n#\t":
                i += 1
            j += 1
        elif text[i] == name[j]:
            i, j = i + 1, j + 1
        else:
            break
    return i


def markdown_files(repo: Docs) -> list[str]:
    return ["README.md", *sorted(f"docs/{p.name}" for p in (repo.root / "docs").glob("*.md"))]


def code_files(repo: Docs) -> list[str]:
    me = Path(__file__).resolve()
    return sorted(str(p.relative_to(repo.root)) for d in CODE_DIRS for p in (repo.root / d).rglob("*.py")
                  if p.resolve() != me and ".venv" not in p.parts)


def all_errors(repo: Docs) -> list[str]:
    errors: list[str] = []
    for md in markdown_files(repo):
        errors += check_links(repo, md) + check_paths(repo, md) + check_citations(repo, md, stray_sections=False)
    for py in code_files(repo):
        errors += check_citations(repo, py, stray_sections=True)
    return errors


# ------------------------------------------------------------------------------------ the repo
REPO = Docs(ROOT)


@pytest.mark.parametrize("md", markdown_files(REPO))
def test_markdown_links_and_paths_resolve(md: str) -> None:
    errors = check_links(REPO, md) + check_paths(REPO, md) + check_citations(REPO, md, stray_sections=False)
    assert not errors, "\n".join(errors)


def test_code_cites_existing_docs_and_headings() -> None:
    errors = [e for py in code_files(REPO) for e in check_citations(REPO, py, stray_sections=True)]
    assert not errors, "\n".join(errors)


def test_docs_exist() -> None:
    for name in ("architecture", "formats", "adapters", "performance", "reliability", "usage", "training",
                 "compatibility"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), name


def test_every_module_has_a_row_in_the_architecture_tables() -> None:
    """docs/architecture.md's module tables name every module of the package, and only modules that exist."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\|\s*`(lokr_diffusers/[\w/]+\.py)`\s*\|", prose(text), flags=re.M))
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "lokr_diffusers").rglob("*.py")}
    assert not modules - rows, f"modules without a row in docs/architecture.md: {sorted(modules - rows)}"
    assert not rows - modules, f"rows for modules that do not exist: {sorted(rows - modules)}"


# ----------------------------------------------------------------------------- the checker itself
@pytest.mark.parametrize(
    ("heading", "expected"),
    [("The math", "the-math"), ("Data flow: load a file", "data-flow-load-a-file"),
     ("Next to diffusers' own LoRA", "next-to-diffusers-own-lora"), ("Export, convert, merge", "export-convert-merge"),
     ("`state.py` and_more", "statepy-and_more"), ("§1 The math", "1-the-math")],
)
def test_slug(heading: str, expected: str) -> None:
    assert slug(heading) == expected


def test_repeated_headings_get_numbered_anchors() -> None:
    assert anchors("# A\n## B\n## B\n```\n## C\n```\n") == {"a", "b", "b-1"}


def _fake_repo(tmp_path: Path) -> Docs:
    (tmp_path / "docs").mkdir()
    (tmp_path / "lokr_diffusers").mkdir()
    (tmp_path / "lokr_diffusers" / "real.py").write_text(
        '"""Good: docs/x.md §Scale rules, §The math and docs/x.md.\n'
        'Wrapped: docs/x.md §Scale\n    rules.\n'
        'Bad: docs/x.md §Nope, docs/missing.md §The math, docs/x.md §2, a bare §3."""\n', encoding="utf-8")
    (tmp_path / "docs" / "x.md").write_text("# X\n\n## The math\n\n## Scale rules\n", encoding="utf-8")
    (tmp_path / "README.md").write_text(
        "[ok](docs/x.md) [ok](docs/x.md#scale-rules) [ok](#top) [web](https://example.com/a#b)\n"
        "[gone](docs/missing.md) [bad anchor](docs/x.md#nope) [outside](../elsewhere.md)\n"
        "`lokr_diffusers/real.py` `lokr_diffusers/*.py` `lokr_diffusers/` `lokr_diffusers/nothere.py`.\n"
        "`[not a link](docs/missing2.md)`\n\n# Top\n", encoding="utf-8")
    return Docs(tmp_path)


def test_checker_finds_what_is_wrong(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    links = check_links(repo, "README.md")
    assert len(links) == 3, links
    assert any("docs/missing.md" in e and "no such file" in e for e in links)
    assert any("#nope" in e and "no heading" in e for e in links)
    assert any("../elsewhere.md" in e for e in links)
    paths = check_paths(repo, "README.md")  # link targets and code spans are paths too
    assert paths == ["README.md:2: docs/missing.md does not exist",
                     "README.md:3: lokr_diffusers/nothere.py does not exist",
                     "README.md:4: docs/missing2.md does not exist"], paths
    cites = check_citations(repo, "lokr_diffusers/real.py", stray_sections=True)
    assert len(cites) == 5, cites
    assert any("'Nope" in e for e in cites)
    assert any("docs/missing.md, which does not exist" in e for e in cites)
    assert any("'2" in e for e in cites)
    assert sum("outside a docs/<name>.md" in e for e in cites) == 2  # §The math after missing.md, and §3


def test_checker_passes_a_good_repo(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.md").write_text("# X\n\n## Key layouts\n\nSee [X](#x), [me](x.md#key-layouts).\n",
                                            encoding="utf-8")
    (tmp_path / "README.md").write_text("[x](docs/x.md#key-layouts), `docs/x.md §Key layouts`.\n", encoding="utf-8")
    repo = Docs(tmp_path)
    assert all_errors(repo) == []
