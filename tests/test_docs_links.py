"""Code cites the project's own docs, and every section it cites exists: a person who clones qaas can read
what a comment points at (docs/architecture.md, docs/engine-notes.md, docs/security.md, ...)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("app", "workers", "qaas", "bench", "tests", "examples", "migrations")
CITATION = re.compile(r"docs/([a-z0-9-]+\.md)(?:#([a-z0-9-]+))?")


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens."""
    headings = (line.lstrip("#").strip() for line in doc.read_text().splitlines() if line.startswith("#"))
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def _files() -> list[Path]:
    found = [p for d in SOURCES for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".html", ".sh", ".md")]
    return [*found, ROOT / "README.md", ROOT / "docker-compose.yml", ROOT / "Dockerfile", ROOT / "Makefile"]


def test_every_cited_doc_and_section_exists() -> None:
    broken = []
    for path in _files():
        for doc, anchor in CITATION.findall(path.read_text(errors="replace")):
            target = ROOT / "docs" / doc
            if not target.is_file() or (anchor and anchor not in _anchors(target)):
                broken.append(f"{path.relative_to(ROOT)}: docs/{doc}{'#' + anchor if anchor else ''}")
    assert not broken, broken


def test_no_code_cites_notes_outside_the_repository() -> None:
    outside = [
        str(path.relative_to(ROOT))
        for path in _files()
        if path != Path(__file__)
        and re.search(r"\b(DESIGN\.md|ENGINE_NOTES)", path.read_text(errors="replace"))
    ]
    assert not outside, f"cite docs/ instead: {outside}"
