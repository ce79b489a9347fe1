import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Results  # noqa: E402

FAMILIES = {}


@pytest.fixture(scope="session")
def results():
    def get(family, baseline="eager"):
        return FAMILIES.setdefault(family, Results(family, baseline))
    return get


def pytest_terminal_summary(terminalreporter):
    for family in FAMILIES.values():
        if family.rows:
            terminalreporter.write_line("")
            terminalreporter.write_line(family.table())
            terminalreporter.write_line(f"written: {family.write()}")
