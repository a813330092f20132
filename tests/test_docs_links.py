"""The documentation's links resolve: every relative link in README.md, BENCHMARKS.md, docs/*.md
and examples/**/*.md names a file or folder that exists, and every `#anchor` it uses is a heading
of the page it points to (GitHub's heading ids). The README stays a front door of at most 250
lines."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT

# Pages that other parts of the project are adding. A link to one of them may point nowhere only
# while the page does not exist; once it does, its links and anchors are checked like any other.
PENDING: set[str] = set()

LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def pages() -> list[Path]:
    found = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
    found += sorted((ROOT / "examples").rglob("*.md"))
    return [p for p in found if p.is_file()]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a link-like text in code is not a link)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's id for a heading: the text without markup, lower-cased, every character other
    than a letter, digit, space, hyphen or underscore dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The ids of a page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    ids = set()
    for line in prose_lines(page.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        ids.add(base if n == 0 else f"{base}-{n}")
    return ids


def broken_links(page: Path, root: Path = ROOT, pending: set[str] = frozenset()) -> list[str]:
    """'page: link (why)' for each relative link of `page` that does not resolve."""
    root = root.resolve()
    bad = []
    # the prose as one text: a link's text may wrap onto the next line
    for target in LINK.findall("\n".join(prose_lines(page.read_text()))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.resolve().relative_to(root)}: {target}"
        if not dest.exists():
            rel = dest.relative_to(root) if dest.is_relative_to(root) else dest
            if str(rel) not in pending:
                bad.append(f"{where} (no such file)")
        elif anchor and (dest.is_dir() or dest.suffix != ".md"):
            bad.append(f"{where} (an anchor into a file that is not a page)")
        elif anchor and anchor not in anchors(dest):
            bad.append(f"{where} (no heading with id {anchor!r})")
    return bad


def test_slug_matches_github_ids():
    # ids GitHub gives these headings, worked by hand from its rule
    assert slug("What `btx evaluate` reports") == "what-btx-evaluate-reports"
    assert slug("GPU check (H100)") == "gpu-check-h100"
    assert slug("The BTX merge, 4 x ~1B") == "the-btx-merge-4-x-1b"
    assert slug("Safety: untrusted checkpoints, configs and scripts") == (
        "safety-untrusted-checkpoints-configs-and-scripts"
    )
    assert (
        slug("HF -> Megatron conversion, ~1B parameters")
        == "hf---megatron-conversion-1b-parameters"
    )
    assert slug("Compute matching (`btx match-compute`)") == "compute-matching-btx-match-compute"


def test_the_checker_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "A.md").write_text("# A\n\n## Two words\n\n## Two words\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/A.md) [ok](docs/A.md#two-words) [ok](docs/A.md#two-words-1) [ok](#top)\n"
        "[web](https://example.org/x.md) [gone](docs/B.md) [no id](docs/A.md#three)\n"
        "[later](docs/C.md) ![img](docs/A.md) [wrapped\ntext](docs/D.md)\n"
        "```\n[in code](docs/nothing.md)\n```\n# Top\n"
    )
    bad = broken_links(page, tmp_path, pending={"docs/C.md"})
    assert bad == [
        "README.md: docs/B.md (no such file)",
        "README.md: docs/A.md#three (no heading with id 'three')",
        "README.md: docs/D.md (no such file)",
    ]


def test_every_relative_link_and_anchor_resolves():
    assert {"README.md", "docs/CONFIG.md"} <= {str(p.relative_to(ROOT)) for p in pages()}
    bad = [b for page in pages() for b in broken_links(page, ROOT, PENDING)]
    assert not bad, "\n".join(bad)


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    # every command of the CLI is listed
    from megatron_btx.cli import COMMANDS

    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    listed = {line.split()[1] for line in block.splitlines() if line.startswith("btx ")}
    assert listed == set(COMMANDS)
