"""mkdocs hooks (``mkdocs.yml``: ``hooks``): generated tables, and links to the repository's files.

**Generated tables.** A page's reference tables are written by the code that reads the settings and
maps the errors, between markers::

    <!-- generated: settings_table() -->
    | Variable | Default | What it does |
    ...
    <!-- end generated -->

At build time each block is replaced by what the code generates now, so the site can never show a
stale table; a committed block that differs is a warning, which fails ``mkdocs build --strict``
(``make docs``, run in CI) until the file is refreshed with ``make docs-tables``
(``python docs/hooks.py --write``). The test suite checks the committed blocks too.

**The home page** is the repository's README.md, so the front door is written once.

**Links out of docs/.** A page may link to a repository file outside ``docs/`` by its relative
path (``../SECURITY.md``, ``../bench/figures/load.png``), which is right when the Markdown is read
on a code host. mkdocs only knows ``docs/``, so the linked file is added to the site under
``repo/<its path>`` (a Markdown file as a page, anything else as is) and the link rewritten to it;
a linked Markdown file's own links are followed the same way. A link to a file that does not
exist is a warning, so ``--strict`` fails on it as on any broken link inside ``docs/``.
"""

from __future__ import annotations

import logging
import posixpath
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SITE_PREFIX = "repo/"
# The site's home page is the README, the repository's front door (docs/ has no index.md).
HOME = "index.md"

log = logging.getLogger("mkdocs.hooks.aifn")

BLOCK = re.compile(
    r"(<!-- generated: (?P<name>[^>]+?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.DOTALL
)
# Inline Markdown links and images: [text](target) / ![alt](target), target without spaces.
LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def _settings() -> str:
    from aifn.settings import settings_table

    return settings_table()


def _classify_settings() -> str:
    from aifn.settings import settings_table

    sys.path.insert(0, str(REPO / "functions" / "classify"))
    try:
        from classify_settings import ClassifySettings
    finally:
        sys.path.remove(str(REPO / "functions" / "classify"))
    return settings_table(ClassifySettings)


def _batch_settings() -> str:
    from aifn.files.processor import BatchSettings
    from aifn.settings import settings_table

    return settings_table(BatchSettings)


def _errors() -> str:
    from aifn.http.errors import errors_table

    return errors_table()


GENERATORS: dict[str, Callable[[], str]] = {
    "settings_table()": _settings,
    "settings_table(ClassifySettings)": _classify_settings,
    "settings_table(BatchSettings)": _batch_settings,
    "errors_table()": _errors,
}


def render_tables(markdown: str, where: str) -> tuple[str, list[str]]:
    """Replace each generated block by the code's table; return the text and the stale blocks."""
    stale: list[str] = []

    def fill(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in GENERATORS:
            stale.append(f"{where}: unknown generated block {name!r}")
            return m.group(0)
        table = GENERATORS[name]().rstrip("\n") + "\n"
        if m.group("body") != table:
            stale.append(f"{where}: the {name} table is stale: run `make docs-tables`")
        return m.group(1) + table + m.group(4)

    return BLOCK.sub(fill, markdown), stale


def _split(target: str) -> tuple[str, str] | None:
    """(path, '#anchor' or '') of a relative link, None for URLs, anchors and absolute paths."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return None
    path, _, anchor = target.partition("#")
    return path, f"#{anchor}" if anchor else ""


def _repo_path(src_uri: str) -> str:
    """Where a site file lives in the repository (POSIX, relative to the repository root)."""
    if src_uri == HOME:
        return "README.md"
    if src_uri.startswith(SITE_PREFIX):
        return src_uri[len(SITE_PREFIX) :]
    return f"docs/{src_uri}"


def _site_uri(repo_path: str) -> str:
    """Where a repository file lives in the site (its src_uri)."""
    if repo_path == "README.md":
        return HOME
    if repo_path.startswith("docs/"):
        return repo_path[len("docs/") :]
    return SITE_PREFIX + repo_path


def _outside_links(text: str, src_uri: str) -> list[tuple[str, str]]:
    """(link as written, repository path) for each link of a page to a file outside docs/."""
    here = posixpath.dirname(_repo_path(src_uri))
    found = []
    for m in LINK.finditer(text):
        split = _split(m.group(2))
        if split is None or not split[0]:
            continue
        target = posixpath.normpath(posixpath.join(here, split[0]))
        if not target.startswith("docs/"):
            found.append((m.group(2), target))
    return found


def on_files(files: Any, config: Any) -> Any:
    """Add the repository files that pages link to outside docs/ (and what those link to)."""
    from mkdocs.structure.files import File

    readme = REPO / "README.md"
    files.append(File.generated(config, HOME, abs_src_path=str(readme)))
    queue = [(f.src_uri, f.content_string) for f in files.documentation_pages()]
    while queue:
        src_uri, text = queue.pop()
        for written, target in _outside_links(text, src_uri):
            path = REPO / target
            if target.startswith("..") or not path.is_file():
                log.warning("%s links to %r: no such file in the repository", src_uri, written)
                continue
            uri = _site_uri(target)
            if files.get_file_from_path(uri) is not None:
                continue
            files.append(File.generated(config, uri, abs_src_path=str(path)))
            if path.suffix == ".md":
                queue.append((uri, path.read_text(encoding="utf-8")))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Fill the generated tables and point links out of docs/ at the files on_files added."""
    markdown, stale = render_tables(markdown, _repo_path(page.file.src_uri))
    for message in stale:
        log.warning(message)
    here = posixpath.dirname(page.file.src_uri)

    def relink(m: re.Match[str]) -> str:
        split = _split(m.group(2))
        if split is None or not split[0]:
            return m.group(0)
        target = posixpath.normpath(
            posixpath.join(posixpath.dirname(_repo_path(page.file.src_uri)), split[0])
        )
        if target.startswith(".."):
            return m.group(0)
        rel = posixpath.relpath(_site_uri(target), here or ".")
        return f"{m.group(1)}{rel}{split[1]}{m.group(3)}"

    return LINK.sub(relink, markdown)


def write_tables() -> list[Path]:
    """Refresh the generated blocks in docs/*.md; return the files changed."""
    changed = []
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        new, _ = render_tables(text, str(path.relative_to(REPO)))
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python docs/hooks.py --write   (refreshes the generated tables in docs/)")
    for p in write_tables():
        print(f"updated {p.relative_to(REPO)}")
