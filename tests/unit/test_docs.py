"""The configuration reference documents every key the parser accepts, and no key it does not."""

from __future__ import annotations

import re
from pathlib import Path

from agent.config import SECTIONS

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def documented() -> dict[str, set[str]]:
    sections: dict[str, set[str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        if m := re.match(r"## \[(\w+)\]", line):
            current = sections.setdefault(m.group(1), set())
        elif current is not None and (m := re.match(r"\| `(\w+)` \|", line)):
            current.add(m.group(1))
    return sections


def test_every_configuration_key_is_documented() -> None:
    docs = documented()
    for name, cls in SECTIONS.items():
        keys = set(cls._fields)
        assert docs.get(name) == keys, f"[{name}] in docs/configuration.md differs: {docs.get(name)} vs {keys}"
    assert set(docs) == set(SECTIONS)
