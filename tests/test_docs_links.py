"""The documentation holds together: every relative link of README.md and docs/*.md (and of
bench/ and slurm/'s READMEs, which link into them; images too) names a file that exists, every
#anchor a heading of its page (GitHub's anchors), and every page under docs/ is linked from the
README. Plain text, no network."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

from conftest import REPO, doc_pages

pytestmark = pytest.mark.unit

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def prose_lines(text: str) -> List[Tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code spans blanked."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, re.sub(r"`[^`]*`", lambda m: "`" + "x" * (len(m.group()) - 2) + "`", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: links reduced to their text, lowercased, every character but
    letters, digits, `_`, `-` and spaces dropped, spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> Set[str]:
    """The anchors of a Markdown file's headings (outside code), a repeated one as GitHub numbers it."""
    seen: Dict[str, int] = {}
    out = set()
    fenced = False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            s = slug(m.group(2))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def links(page: Path) -> List[Tuple[int, str]]:
    return [(n, m.group(1)) for n, line in prose_lines(page.read_text()) for m in LINK.finditer(line)]


def broken_links(page: Path, root: Path = REPO) -> List[str]:
    """Each relative link of `page` whose file or #anchor does not exist, as 'page:line: target (why)'
    (paths shown from `root`)."""
    bad = []
    for n, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check here
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(root)}:{n}: {target}"
        if not dest.exists():
            bad.append(f"{where} (no such file: {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{where} (no heading with anchor #{anchor} in {dest.relative_to(root)})")
        elif anchor and dest.suffix != ".md":
            bad.append(f"{where} (an anchor into a file that is not Markdown)")
    return bad


def test_slug_is_githubs():
    assert slug("`decode.reduced_jpeg`: what it changes, when to use it") == \
        "decodereduced_jpeg-what-it-changes-when-to-use-it"
    assert slug("Speed and memory: `make bench`") == "speed-and-memory-make-bench"
    assert slug("First run (on the bundled sample photos)") == "first-run-on-the-bundled-sample-photos"
    assert slug("Where the 26-32% went, and the new defaults") == "where-the-26-32-went-and-the-new-defaults"


def test_there_are_pages_and_links_to_check():
    pages = doc_pages()
    assert pages[0] == REPO / "README.md" and len(pages) >= 10, pages
    assert sum(len(links(p)) for p in pages) >= 50
    assert any("#" in t for p in pages for _, t in links(p))


@pytest.mark.parametrize("page", doc_pages() + [REPO / "bench" / "README.md", REPO / "slurm" / "README.md"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page):
    bad = broken_links(page)
    assert not bad, "\n".join(bad)


def test_a_broken_link_or_anchor_is_found(tmp_path):
    """The check itself: a missing file, a missing heading, and a heading that exists only inside
    a code block are each reported; a good link and a web address are not."""
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading: yes\n\n```bash\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-code-heading-yes) [web](https://example.org/x#y) [self](#top)\n\n# Top\n\n"
                    "[gone](missing.md) [no anchor](other.md#nope) [fenced](other.md#not-a-heading)\n"
                    "`[in code](missing-too.md)`\n")
    bad = broken_links(page, root=tmp_path)
    assert [b.split(": ")[1].split(" ")[0] for b in bad] == ["missing.md", "other.md#nope",
                                                              "other.md#not-a-heading"], bad


def test_every_docs_page_is_linked_from_the_readme():
    readme = REPO / "README.md"
    linked = {(readme.parent / t.partition("#")[0]).resolve() for _, t in links(readme)}
    orphans = [str(p.relative_to(REPO)) for p in doc_pages()[1:] if p.resolve() not in linked]
    assert not orphans, f"docs pages the README's 'Where the rest is' does not link: {orphans}"
