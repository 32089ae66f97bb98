"""The documents stay true to the code and the tests (fast tier, no mount):

- every example in doc/SEMANTICS.md is followed by a ``Test:`` line, and every
  test a ``Test:`` line names exists;
- every relative link in README.md, doc/*.md and developer-notes/*.md points to
  a file that exists (and, with ``#anchor``, to a heading in it);
- every mount option of versionfs/options.py is in doc/OPERATING.md;
- every command of ``versionfs --help`` has its example in README.md;
- no document points to the design contract by a path outside the repository.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from versionfs import cli
from versionfs.options import OPTIONS

ROOT = Path(__file__).resolve().parent.parent
SEMANTICS = ROOT / "doc" / "SEMANTICS.md"
OPERATING = ROOT / "doc" / "OPERATING.md"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "doc").glob("*.md")), *sorted((ROOT / "developer-notes").glob("*.md"))]
TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def sections(text: str) -> list[tuple[str, list[str]]]:
    """(heading, lines) for each ``#``-heading of a markdown text, fenced blocks kept
    whole (a ``#`` inside one is not a heading)."""
    out: list[tuple[str, list[str]]] = [("(top)", [])]
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,6} ", line):
            out.append((line.lstrip("#").strip(), []))
        else:
            out[-1][1].append(line)
    return out


def test_every_semantics_example_names_its_test():
    missing = []
    for heading, lines in sections(SEMANTICS.read_text()):
        fenced, waiting = False, None  # waiting: the first line of an example without its Test: yet
        for number, line in enumerate(lines):
            if line.startswith("```"):
                if not fenced and waiting is not None:
                    missing.append(f"{heading}: the example at {waiting!r}")
                fenced = not fenced
                if fenced:
                    waiting = lines[number + 1] if number + 1 < len(lines) else line
            elif not fenced and "Test: tests/" in line:
                waiting = None
        if waiting is not None:
            missing.append(f"{heading}: the example at {waiting!r}")
    assert not missing, "examples without a Test: line:\n" + "\n".join(missing)


def test_every_test_named_by_semantics_exists():
    refs = TEST_REF.findall(SEMANTICS.read_text())
    assert len(refs) > 50
    absent = []
    for path, name in refs:
        file = ROOT / path
        if not file.is_file():
            absent.append(f"{path} (no such file)")
        elif not re.search(rf"^(async )?def {name}\(", file.read_text(), re.M):
            absent.append(f"{path}::{name}")
    assert not absent, "Test: lines naming what does not exist:\n" + "\n".join(absent)


def test_semantics_tests_written_for_it_name_their_section():
    headings = {h for h, _ in sections(SEMANTICS.read_text())}
    text = (ROOT / "tests" / "test_semantics.py").read_text()
    named = re.findall(r"SEMANTICS\.md § ([^:\n]+?)(?::|\n)", text)
    unknown = [n for n in named if not any(h.startswith(n.strip()) for h in headings)]
    assert named and not unknown, f"test_semantics.py names sections SEMANTICS.md does not have: {unknown}"


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(h) for h, _ in sections(path.read_text())[1:]}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_what_exists(document):
    broken = []
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, fragment = target.partition("#")
        file = (document.parent / path).resolve() if path else document
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{document.name}: " + ", ".join(broken)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_path_to_a_design_contract_outside_the_repository(document):
    assert "shared/DESIGN" not in document.read_text()


def test_every_mount_option_is_in_operating():
    text = OPERATING.read_text()
    missing = [o.name for o in OPTIONS if f"`{o.name}=" not in text or f"`{o.flag} " not in text]
    assert not missing, f"mount options missing from doc/OPERATING.md (as `name=…` and `--flag …`): {missing}"


def test_every_command_has_its_example_in_the_readme():
    text = (ROOT / "README.md").read_text()
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    listed = [choice.dest for choice in sub._choices_actions]
    assert len(listed) >= 12
    missing = [name for name in listed if f"**{name}**" not in text or f"versionfs {name}" not in text]
    assert not missing, f"commands without an example in README.md: {missing}"
