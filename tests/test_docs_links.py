"""Every relative markdown link of the project's docs points to a path inside the repository.

Checked files: README.md, docs/*.md, launch/README.md, docker/README.md. A link is
`[text](target)` or `![alt](target)` (or a reference definition `[id]: target`) outside
code blocks and code spans. http(s) links are ignored; a target that is absolute, has
another scheme, climbs out of the repository (`../shared/...` from the root) or names a
missing path fails; a `#fragment` into a markdown file must name one of its headings
(GitHub's heading slugs).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def doc_files(root: Path = ROOT) -> list[Path]:
    """The markdown files whose links are checked."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md")),
            root / "launch" / "README.md", root / "docker" / "README.md"]


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line without code spans) of the lines outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, _CODE_SPAN.sub("", line)))
    return lines


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition."""
    found = []
    for number, line in _prose_lines(text):
        found += [(number, match.group(1)) for match in _INLINE.finditer(line)]
        reference = _REFERENCE.match(line)
        if reference:
            found.append((number, reference.group(1)))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = _CODE_SPAN.sub(lambda m: m.group(0).strip("`"), heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The heading anchors of a markdown file (repeated headings get -1, -2, ...)."""
    seen: dict[str, int] = {}
    result = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        heading = None if fenced else _HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def check_link(doc: Path, target: str, root: Path = ROOT) -> str | None:
    """Why the link `target` of `doc` is broken, or None when it is fine (or http(s))."""
    if target.startswith(("http://", "https://")):
        return None
    if not target:
        return "empty link target"
    if _SCHEME.match(target):
        return f"{target!r} is not a relative path (only http(s) links may leave the repository)"
    path_part, _, fragment = target.partition("#")
    path_part = unquote(path_part)
    if path_part.startswith("/"):
        return f"{target!r} is an absolute path; link relative to {doc.name}"
    resolved = (doc.parent / path_part).resolve() if path_part else doc.resolve()
    repo = root.resolve()
    if resolved != repo and repo not in resolved.parents:
        return f"{target!r} points outside the repository ({resolved})"
    if not resolved.exists():
        return f"{target!r} does not exist ({resolved.relative_to(repo)})"
    if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
        return f"{target!r}: {resolved.relative_to(repo)} has no heading with anchor #{fragment}"
    return None


def problems_in(doc: Path, root: Path = ROOT) -> list[str]:
    text = doc.read_text(encoding="utf-8")
    where = doc.relative_to(root)
    found = []
    for number, target in links(text):
        problem = check_link(doc, target, root)
        if problem:
            found.append(f"{where}:{number}: {problem}")
    return found


def test_every_relative_link_in_the_docs_points_into_the_repository() -> None:
    files = doc_files()
    missing = [str(p.relative_to(ROOT)) for p in files if not p.is_file()]
    assert not missing, f"documentation files to check are missing: {missing}"
    problems = [problem for doc in files for problem in problems_in(doc)]
    assert not problems, "broken documentation links:\n" + "\n".join(problems)


def test_readme_links_every_doc() -> None:
    readme = ROOT / "README.md"
    linked = {(readme.parent / unquote(t.partition("#")[0])).resolve()
              for _, t in links(readme.read_text(encoding="utf-8"))}
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link docs/{unlinked}"


def test_the_checker_rejects_escaping_absolute_missing_and_bad_anchor_links(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "docs" / "a.md").write_text("# Title\n\n## Training checkpoints\n", encoding="utf-8")
    readme = repo / "README.md"
    readme.write_text(
        "\n".join([
            "[design](../shared/DESIGN.md)",              # 1: escapes the repository
            "[abs](/work/shared/LOSSES.md)",              # 2: absolute
            "[gone](docs/missing.md)",                    # 3: missing
            "[anchor](docs/a.md#no-such-heading)",        # 4: bad anchor
            "[file](file:///etc/passwd)",                 # 5: another scheme
            "[ok](docs/a.md) [ok too](docs/a.md#training-checkpoints) [web](https://example.org/x)",
            "![image](docs/a.md)",
            "`[code](../not/a/link.md)`",
            "```",
            "[fenced](../not/a/link/either.md)",
            "```",
            "[ref]: ../outside.md",                       # 12: reference definition, escapes
        ]) + "\n",
        encoding="utf-8",
    )
    problems = problems_in(readme, repo)
    lines = sorted(int(p.split(":")[1]) for p in problems)
    assert lines == [1, 2, 3, 4, 5, 12], problems
    assert "outside the repository" in problems[0] and "absolute path" in problems[1]
    assert "does not exist" in problems[2] and "#no-such-heading" in problems[3]


def test_slugs_follow_github_headings() -> None:
    assert slug("RecordIO: `train.rec` + `train.idx`") == "recordio-trainrec--trainidx"
    assert slug("Differences from arcface_torch") == "differences-from-arcface_torch"
    assert slug("Verification sets: `.bin`") == "verification-sets-bin"
