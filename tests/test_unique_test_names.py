"""pytest collects tests/ and e2e/ in one run (`pytest tests e2e`) with rootdir-relative imports: two test files
with one basename stop the whole collection ("import file mismatch")."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_test_file_basenames_are_unique_across_tests_and_e2e() -> None:
    names = Counter(p.name for d in ("tests", "e2e") for p in (ROOT / d).rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1], [n for n, c in names.items() if c > 1]
