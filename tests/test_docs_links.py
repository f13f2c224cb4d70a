"""Every relative link and #anchor in the README and docs/ resolves (a renamed heading breaks one)."""

import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _markdown_files():
    out = [os.path.join(REPO, "README.md")]
    for folder in ("docs", "bench", "launch"):
        root = os.path.join(REPO, folder)
        out += sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".md"))
    return out


def _anchor(heading: str) -> str:
    """GitHub's slug: lower case, punctuation dropped, spaces to hyphens."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    anchors, seen, fenced = set(), {}, False
    for line in open(path, encoding="utf-8"):
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not line.startswith("#"):
            continue
        slug = _anchor(line.lstrip("#"))
        n = seen.get(slug, 0)
        anchors.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return anchors


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: os.path.relpath(p, REPO))
def test_links_resolve(path):
    broken = []
    for target in LINK.findall(open(path, encoding="utf-8").read()):
        if "://" in target or target.startswith("mailto:"):
            continue
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(dest):
            broken.append(f"{target} (no file)")
        elif anchor and dest.endswith(".md") and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading)")
    assert not broken, f"{os.path.relpath(path, REPO)}: " + ", ".join(broken)


def test_readme_size():
    assert os.path.getsize(os.path.join(REPO, "README.md")) <= 12 * 1024
