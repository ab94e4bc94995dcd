"""docs/imap-conformance.md names a test for each requirement: every name it gives exists, so
a renamed or removed test cannot leave a requirement pointing at nothing."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "imap-conformance.md"
TESTS = ROOT / "tests"


def _sources() -> dict[Path, str]:
    return {path: path.read_text() for path in TESTS.rglob("test_*.py")}


def _defines(source: str, name: str) -> bool:
    pattern = re.escape(name).replace(r"\*", r"\w*")  # `test_references*` names a family
    return re.search(rf"^\s*(?:async\s+)?def {pattern}\b", source, re.MULTILINE) is not None


def _module(reference: str) -> str:
    """`commands` (RFC 3501 table), `unit/imap/test_selected.py` or `test_compress.py`."""
    if reference.endswith(".py"):
        return reference.rsplit("/", 1)[-1]
    return f"test_{reference}.py"


def test_every_test_the_conformance_doc_names_exists() -> None:
    doc = DOC.read_text()
    sources = _sources()
    missing = [name for name in sorted(set(re.findall(r"\btest_\w+\*?", doc)))
               if not name.endswith(".py") and name + ".py" not in {p.name for p in sources}
               and not any(_defines(source, name) for source in sources.values())]
    misplaced = [f"{module}::{name}" for module, name in
                 re.findall(r"`([\w/.]+)::(test_\w+\*?)`", doc)
                 if not any(path.name == _module(module) and _defines(source, name)
                            for path, source in sources.items())]
    assert not missing and not misplaced, (missing, misplaced)
