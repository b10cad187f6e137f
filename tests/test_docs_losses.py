"""docs/losses.md documents exactly the registered margins: one `### name` heading each
(a heading may list several names separated by commas; a parenthesis is a comment)."""

from __future__ import annotations

import re
from pathlib import Path

from fr_trainer.margins import list_margins

LOSSES_MD = Path(__file__).resolve().parents[1] / "docs" / "losses.md"


def documented_margins(text: str) -> set[str]:
    """Names in the `### ...` headings under `## Margins` (up to the next `## `)."""
    section = ("\n" + text).split("\n## Margins\n", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for heading in re.findall(r"^### (.+)$", section, flags=re.MULTILINE):
        heading = re.sub(r"\(.*?\)", "", heading)
        names.update(name.strip() for name in heading.split(",") if name.strip())
    return names


def test_losses_md_has_a_section_for_every_registered_margin_and_no_other() -> None:
    documented = documented_margins(LOSSES_MD.read_text(encoding="utf-8"))
    registered = set(list_margins())
    assert documented == registered, (
        f"undocumented: {sorted(registered - documented)}; not registered: {sorted(documented - registered)}")


def test_the_parser_reads_lists_and_drops_comments() -> None:
    text = "## Margins\n\n### a, b (note)\n\n### c\n\n## Other\n\n### d\n"
    assert documented_margins(text) == {"a", "b", "c"}
