"""The documentation stays true to itself: the options table is the options' own help, the README
stays short, and every relative link in README.md and docs/*.md leads somewhere that exists."""

import re
import unicodedata
from pathlib import Path

import pytest

from claude_router import docs_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_BYTES = 15 * 1024

LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> list[str]:
    """The page's lines outside fenced code blocks, inline code removed."""
    lines, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text only
    text = text.lower()
    kept = []
    for ch in text:
        if ch in " -_" or unicodedata.category(ch)[0] in "LN":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in _prose(path.read_text(encoding="utf-8")):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        result.add(slug if n == 0 else f"{slug}-{n}")
    return result


def links(path: Path) -> list[str]:
    # Code spans are not links; a link's text may wrap onto the next line.
    prose = "\n".join(re.sub(r"`[^`]*`", "``", line) for line in _prose(path.read_text(encoding="utf-8")))
    return LINK.findall(prose)


def test_slug_matches_github():
    assert _slug("Several processes behind one address: `--workers`") == \
        "several-processes-behind-one-address---workers"
    assert _slug("Named clients, budgets and usage") == "named-clients-budgets-and-usage"
    assert _slug("Base URL in `~/.claude/settings.json`") == "base-url-in-claudesettingsjson"


def test_options_table_is_generated_from_the_options_help():
    doc = ROOT / "docs" / "operations.md"
    committed = doc.read_text(encoding="utf-8")
    assert docs_table.START in committed and docs_table.END in committed
    assert committed == docs_table.render(committed), (
        "docs/operations.md's options table differs from options.py's help: run "
        "`.venv/py3.12/bin/python -m claude_router.docs_table --write`")


def test_options_table_lists_every_option():
    table = docs_table.options_table()
    from claude_router import options
    for name in options.ALL:
        assert f"| `{name}` |" in table


def test_render_replaces_only_between_the_markers():
    doc = f"before\n{docs_table.START}\nstale\n{docs_table.END}\nafter\n"
    out = docs_table.render(doc)
    assert out.startswith(f"before\n{docs_table.START}\n| option |")
    assert out.endswith(f"{docs_table.END}\nafter\n")
    assert "stale" not in out
    with pytest.raises(ValueError):
        docs_table.render("no markers here")


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; at most {README_MAX_BYTES}: move detail into docs/"


def test_readme_links_every_docs_page():
    targets = {link.split("#")[0] for link in links(README)}
    for page in DOCS:
        if page.name == "mutation.md":
            continue  # linked from testing.md
        assert f"docs/{page.name}" in targets, f"README.md does not link docs/{page.name}"
    assert "mutation.md" in {link.split("#")[0] for link in links(ROOT / "docs" / "testing.md")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(page):
    broken = []
    for link in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # https:, mailto:...
            continue
        target, _, anchor = link.partition("#")
        file = (page.parent / target).resolve() if target else page
        if not file.exists():
            broken.append(f"{link}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{link}: no heading with that anchor in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_config_example_is_a_valid_router_yaml(tmp_path):
    """The README's router.yaml example passes the config file's own loading and validation as
    written (only its env: references are given values)."""
    from claude_router import config

    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README.md has no yaml example"
    for i, block in enumerate(blocks):
        file = tmp_path / f"router{i}.yaml"
        file.write_text(block, encoding="utf-8")
        env = {name: f"sk-example-{name.lower()}-0123456789" for name in re.findall(r"env:(\w+)", block)}
        assert config.load(str(file), env).endpoints
