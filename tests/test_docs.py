"""README.md is the front door and docs/ the manual, a MkDocs site (mkdocs.yml): every relative
link and image resolves, the site builds with `mkdocs build --strict`, and README.md stays short.

The link check needs nothing beyond the standard library, so it runs without the `docs` extra; the
build runs when MkDocs and the Material theme are installed (the `docs` and `test` extras)."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import unicodedata
import urllib.parse

import pytest

from cli_helpers import REPO

DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
README_MAX_LINES = 350

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target); the target may be <bracketed> and followed by a "title".
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text, blank_code_spans=True):
    """(line number, line) outside fenced code blocks, with inline code spans blanked if asked."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if match:
            if fence is None:
                fence = match.group(1)
            elif match.group(1) == fence:
                fence = None
            continue
        if fence is None:
            yield number, _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line) if blank_code_spans else line


def slug(heading):
    """A heading's anchor as GitHub makes it, and as mkdocs.yml makes MkDocs make it
    (pymdownx.slugs.slugify(case="lower")): lower case, punctuation dropped, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = text.replace("`", "").replace("**", "").replace("__", "")
    text = re.sub(r"</?[^>]*>", "", unicodedata.normalize("NFC", text)).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    """The slugs of a Markdown file's headings (not counting lines in code blocks), in order."""
    found = []
    for _, line in _prose_lines(path.read_text(encoding="utf-8"), blank_code_spans=False):
        match = _HEADING.match(line)
        if match:
            found.append(slug(match.group(2)))
    return found


def links(path):
    """(line number, target) of every link and image in a Markdown file, outside code."""
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        for pattern in (_INLINE_LINK, _REFERENCE_DEFINITION, _HTML_LINK):
            for match in pattern.finditer(line):
                yield number, match.group(1).strip("<>")


def broken_links(path, site_root=None):
    """One message per relative link or image of `path` that does not resolve: a missing file, a
    missing #anchor in a Markdown target, an absolute path, or (when `site_root` is given) a file
    outside the site, which MkDocs cannot serve. http(s) and mailto links are not followed."""
    problems = []
    for number, target in links(path):
        where = f"{path.name}:{number}: {target}"
        parsed = urllib.parse.urlsplit(target)
        if parsed.scheme or parsed.netloc:
            continue  # external: not fetched
        file_part, anchor = urllib.parse.unquote(parsed.path), urllib.parse.unquote(parsed.fragment)
        if file_part.startswith("/"):
            problems.append(f"{where}: an absolute path; link relative to {path.name}")
            continue
        resolved = (path.parent / file_part).resolve() if file_part else path.resolve()
        if not resolved.exists():
            problems.append(f"{where}: no such file {resolved}")
            continue
        if site_root is not None and not resolved.is_relative_to(site_root.resolve()):
            problems.append(f"{where}: outside {site_root.name}/, which the site cannot link to; "
                            "name the file in a code span instead")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: {resolved.name} has no heading with the anchor #{anchor}")
    return problems


def test_the_link_checker_flags_what_is_broken(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "outside.md").write_text("# Outside\n", encoding="utf-8")
    (tmp_path / "site" / "picture.png").write_bytes(b"")
    (tmp_path / "site" / "other.md").write_text(
        "# Other page\n\n## Decoding once: `--cache_dir`\n\n```\n# not a heading\n```\n", encoding="utf-8")
    page = tmp_path / "site" / "page.md"
    page.write_text(
        "# A page\n\n"
        "[fine](other.md) [fine](other.md#decoding-once---cache_dir) [fine](#a-page) ![fine](picture.png)\n"
        "[external](https://example.com/nowhere.md) [mail](mailto:a@b.c) `[in code](gone.md)`\n"
        "```\n[in a block](gone.md)\n```\n"
        "[missing file](gone.md)\n"
        "![missing image](images/gone.png)\n"
        "[missing anchor](other.md#other-page-2)\n"
        "[a comment in a code block is no heading](other.md#not-a-heading)\n"
        "[missing anchor here](#nowhere)\n"
        "[absolute](/other.md)\n"
        "[outside the site](../outside.md)\n"
        '<img src="gone.svg">\n'
        "[ref]: gone-too.md\n",
        encoding="utf-8")
    problems = broken_links(page, site_root=tmp_path / "site")
    assert [problem.split(": ")[1] for problem in problems] == [
        "gone.md", "images/gone.png", "other.md#other-page-2", "other.md#not-a-heading", "#nowhere",
        "/other.md", "../outside.md", "gone.svg", "gone-too.md"], problems
    assert broken_links(page) == [p for p in problems if "outside.md" not in p]  # no site: any file


def test_slugs_are_githubs():
    assert slug("Long runs: checking data, resuming, numerical faults, reproducibility") == \
        "long-runs-checking-data-resuming-numerical-faults-reproducibility"
    assert slug("Decoding once: `--cache_dir`") == "decoding-once---cache_dir"
    assert slug("Why tf.data's autotuner is off") == "why-tfdatas-autotuner-is-off"


@pytest.mark.parametrize("path", [REPO / "README.md", *PAGES], ids=lambda path: path.name)
def test_every_relative_link_and_image_resolves(path):
    site_root = DOCS if path.parent == DOCS else None
    assert broken_links(path, site_root=site_root) == []


@pytest.mark.parametrize("path", [REPO / "README.md", *PAGES], ids=lambda path: path.name)
def test_headings_have_distinct_anchors(path):
    # GitHub numbers a repeated anchor -1, MkDocs _1: a link to either would work in only one place.
    found = anchors(path)
    assert sorted({a for a in found if found.count(a) > 1}) == []


def test_the_navigation_lists_every_page():
    config = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    listed = re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?([\w./-]+\.md)\s*$", config, re.M)
    assert sorted(listed) == sorted(page.name for page in PAGES)


def test_the_readme_is_the_front_door():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def _mkdocs_build(config_dir, site_dir):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # Material's notice about its successor
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config_dir / "mkdocs.yml"),
         "--site-dir", str(site_dir)],
        capture_output=True, text=True, timeout=300, env=env, cwd=config_dir)


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason='MkDocs and the Material theme are not installed: pip install -e ".[docs]"')
def test_the_site_builds_strictly(tmp_path):
    result = _mkdocs_build(REPO, tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    for page in PAGES:
        built = "index.html" if page.stem == "index" else f"{page.stem}/index.html"
        assert (tmp_path / "site" / built).is_file(), built

    # The same site with one broken anchor does not build: the strictness is real.
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(REPO / "mkdocs.yml", copy / "mkdocs.yml")
    shutil.copytree(DOCS, copy / "docs")
    with open(copy / "docs" / "index.md", "a", encoding="utf-8") as page:
        page.write("\n[a broken anchor](training.md#no-such-heading)\n")
    result = _mkdocs_build(copy, tmp_path / "site_copy")
    assert result.returncode != 0 and "no-such-heading" in result.stderr, result.stderr[-3000:]
