"""The README and docs/: every relative link and anchor resolves, no issue numbers reach user docs, and the README
stays a page a newcomer reads in ten minutes."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of PATH's headings: lower case, punctuation dropped but '-' and '_', spaces as '-'."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", path.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in LINK.findall(FENCE.sub("", path.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # a web address: not ours to resolve
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    return broken


def test_every_relative_link_and_anchor_in_the_docs_resolves():
    assert [broken for path in DOCS for broken in broken_links(path)] == []


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](#nothing) [file](missing.md) [web](https://example.com)\n")
    assert [entry.split(": ", 1)[1] for entry in broken_links_in(page, tmp_path)] == [
        "#nothing (no such heading)", "missing.md (no such file)"]


def broken_links_in(path: Path, root: Path) -> list[str]:
    global ROOT
    saved, ROOT = ROOT, root
    try:
        return broken_links(path)
    finally:
        ROOT = saved


def test_no_issue_numbers_reach_the_user_docs():
    assert [f"{path.name}: {line}" for path in DOCS for line in path.read_text().splitlines()
            if re.search(r"\bissues? \d+", line, re.I)] == []


def test_the_readme_is_a_page_a_newcomer_reads_in_ten_minutes():
    assert (ROOT / "README.md").read_text().count("\n") <= 250
