"""pytest imports test files by basename (rootdir import mode): two files of one name in tests/ and e2e/ stop collection."""

from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_file_name_is_unique_across_tests_and_e2e():
    names = Counter(p.name for d in ("tests", "e2e") for p in (ROOT / d).rglob("test_*.py"))
    twins = sorted(n for n, c in names.items() if c > 1)
    assert not twins, f"{twins}: rename one file of each pair"
