"""The documentation holds: README.md and docs/*.md link only to things that exist (files and GitHub heading anchors),
README.md stays short, and docs/cli.md lists every long option that each command's real ``--help`` shows."""

from __future__ import annotations

import re
import unicodedata
from functools import cache
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
CLI_DOC = DOCS / "cli.md"
README_MAX_BYTES = 15_000

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def headings(text: str) -> list[tuple[int, str]]:
    """``(level, text)`` of every ATX heading outside code blocks."""
    found = []
    for _, line in prose_lines(text):
        m = _HEADING.match(line)
        if m:
            found.append((len(m.group(1)), m.group(2)))
    return found


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: inline markup dropped, lower case, punctuation other than ``-`` and ``_``
    removed, each space a ``-`` (so "a — b" gives ``a--b``)."""
    text = _INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links keep their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    kept = []
    for ch in text:
        if ch in "-_ " or ch.isalnum() or unicodedata.category(ch).startswith("M"):  # letters, digits, marks
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every heading anchor of a Markdown file; repeated headings get ``-1``, ``-2``, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, text in headings(path.read_text(encoding="utf-8")):
        slug = github_slug(text)
        if slug in seen:
            seen[slug] += 1
            slug = f"{slug}-{seen[slug]}"
        else:
            seen[slug] = 0
        out.add(slug)
    return frozenset(out)


def links(path: Path) -> list[tuple[int, str]]:
    """``(line, target)`` of every Markdown link and image outside code (fenced or inline)."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = _INLINE_CODE.sub("", line)
        found += [(number, m.group(1)) for m in _LINK.finditer(line)]
    return found


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """One line per link in ``path`` whose file or heading anchor does not exist (paths shown relative to ``root``)."""
    problems = []
    for number, target in links(path):
        if _EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where} (no such file)")
        elif anchor:
            if dest.suffix != ".md":
                problems.append(f"{where} (an anchor into a file that is not Markdown)")
            elif anchor not in anchors(dest):
                problems.append(f"{where} (no heading with anchor #{anchor} in {dest.name})")
    return problems


def test_slugs_follow_github_rules() -> None:
    assert github_slug("Safety and limits (untrusted inputs, outputs and bundles)") == \
        "safety-and-limits-untrusted-inputs-outputs-and-bundles"
    assert github_slug("## `flare-run`".lstrip("# ")) == "flare-run"
    assert github_slug("flare — FLARE23 abdominal CT: train") == "flare--flare23-abdominal-ct-train"
    assert github_slug("Export: checkpoints → verified bundle (`flare-export`)") == \
        "export-checkpoints--verified-bundle-flare-export"
    assert github_slug("TensorRT (`--trt`): unverified") == "tensorrt---trt-unverified"


def test_the_docs_pages_exist_and_the_index_lists_them() -> None:
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    linked = {t.partition("#")[0] for _, t in links(DOCS / "index.md")}
    assert pages <= linked, f"docs/index.md does not link {sorted(pages - linked)}"
    assert "architecture.md" in index


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(path: Path) -> None:
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_broken_links_are_found(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A `b` (c)\n\n[ok](#a-b-c) [bad](#nope) [gone](missing.md) `[code](x.md)`\n"
                    "```\n[fenced](y.md)\n```\n[web](https://example.org/#x)\n", encoding="utf-8")
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 2 and "#nope" in problems[0] and "missing.md" in problems[1]


def test_readme_is_short_and_keeps_the_set_up_commands() -> None:
    readme = REPO / "README.md"
    size = readme.stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, more than {README_MAX_BYTES}: move reference to docs/"
    text = readme.read_text(encoding="utf-8")
    for needed in ("make demo", "make test", "pytest"):
        assert needed in text


# -- the CLI reference against the real --help ---------------------------------------------------------------------
_OPTION_ROW = re.compile(r"^[│|]?\s{0,4}(?:\*\s+)?((?:-{1,2}[A-Za-z0-9][\w-]*[\s,/]*)+)")
_LONG = re.compile(r"--[A-Za-z0-9][\w-]*")


def help_options(help_text: str) -> set[str]:
    """The long options that ``--help`` lists: the flags at the start of an option row (rich boxes or plain click),
    not the ones a description mentions."""
    found: set[str] = set()
    for line in help_text.splitlines():
        m = _OPTION_ROW.match(line)
        if m:
            found.update(_LONG.findall(m.group(1)))
    return found


def _commands() -> list[Any]:
    """``(console script, subcommand path)`` for every command and subcommand (``flare-train fit``, ...)."""
    import typer
    from flare.runtime.app.entrypoints import COMMANDS, missing_modules

    out = []
    for name, cmd in COMMANDS.items():
        gone = missing_modules([module for module, _ in cmd.needs])
        if gone:
            out.append(pytest.param(name, (), id=name, marks=pytest.mark.skip(
                reason=f"{name}: its extra is not installed (no module {', '.join(gone)})")))
            continue
        click_cmd = typer.main.get_command(import_module(cmd.target).app)
        subs = sorted(getattr(click_cmd, "commands", {}) or {})
        out += [pytest.param(name, (sub,), id=f"{name} {sub}") for sub in subs] or [pytest.param(name, (), id=name)]
    return out


def help_text(name: str, sub: tuple[str, ...]) -> str:
    from flare.runtime.app.entrypoints import COMMANDS
    from typer.testing import CliRunner

    app = import_module(COMMANDS[name].target).app
    width = 200
    result = CliRunner().invoke(app, [*sub, "--help"], env={"COLUMNS": str(width), "TERMINAL_WIDTH": str(width)},
                                terminal_width=width)
    assert result.exit_code == 0, result.output
    return result.output


def table_options(section: str) -> set[str]:
    """The long options named in the first cell of the section's table rows (``| `-o, --out` | ... |``)."""
    found: set[str] = set()
    for _, line in prose_lines(section):
        if line.startswith("|"):
            found.update(_LONG.findall(line.split("|")[1]))
    return found


def doc_section(text: str, title: str, level: int) -> str:
    """The text under the heading ``title`` (at ``level``) up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    start = None
    for i, line in enumerate(lines):
        m = _HEADING.match(line)
        if not m:
            continue
        if start is None:
            if len(m.group(1)) == level and m.group(2) == title:
                start = i
        elif len(m.group(1)) <= level:
            return "\n".join(lines[start:i])
    assert start is not None, f"docs/cli.md has no heading {'#' * level} {title}"
    return "\n".join(lines[start:])


def test_help_options_are_parsed_from_rich_and_plain_help() -> None:
    rich = ("│ *  --out             -o                 <path>   bundle folder [required]  │\n"
            "│    --verify              --no-verify    <bool>   check parity; see --trt  │\n"
            "│                                                  and --bundle, --device   │\n")
    plain = "Options:\n  -n, --cases <int range>  [default: 40]\n  --resume / --no-resume  continue\n" \
            "                          from --fake\n  --help  Show this message and exit.\n"
    assert help_options(rich) == {"--out", "--verify", "--no-verify"}
    assert help_options(plain) == {"--cases", "--resume", "--no-resume", "--help"}


@pytest.mark.parametrize(("name", "sub"), _commands())
def test_cli_reference_lists_every_option_of_help(name: str, sub: tuple[str, ...]) -> None:
    shown = help_options(help_text(name, sub))
    assert "--help" in shown and len(shown) >= 2, f"could not parse `{name} {' '.join(sub)} --help`"
    title = f"`{' '.join((name, *sub))}`"
    section = doc_section(CLI_DOC.read_text(encoding="utf-8"), title, 3 if sub else 2)
    documented = table_options(section)
    missing = sorted(shown - documented - {"--help"})  # every command has --help (the page's introduction says so)
    assert not missing, (f"docs/cli.md section {title} has no table row for these options that "
                         f"`{name} {' '.join(sub)} --help`".replace("  ", " ") + f" shows: {', '.join(missing)}")
