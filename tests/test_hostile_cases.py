"""Every hostile case of tests/hostile_cases.py, with its exact expected outcome: the exit code, the one
stderr line, inputs unchanged, no partial output, and for a success what the output holds (issue 19).
scripts/hostile_table.py runs the same cases and writes their table into docs/reliability.md."""

from __future__ import annotations

from collections import Counter

import pytest

from hostile_cases import CASES, Fixtures, run_case


@pytest.fixture(scope="session")
def hostile_fixtures(tmp_path_factory):
    return Fixtures(tmp_path_factory.mktemp("hostile-fixtures"))


def test_the_catalogue_is_large_and_varied():
    assert len(CASES) >= 170
    assert len({c.id for c in CASES}) == len(CASES)
    counts = Counter(c.category for c in CASES)
    assert len(counts) >= 15 and min(counts.values()) >= 5, counts
    assert sum(c.code == 0 for c in CASES) >= 20  # the allowed ways, next to the refused ones


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_case(case, hostile_fixtures, tmp_path):
    outcome = run_case(case, hostile_fixtures, tmp_path / "case")
    detail = "\n  ".join(outcome.failures)
    assert outcome.passed, (f"{case.id} ({case.category}: {case.does})\n  {detail}\n"
                            f"stderr:\n{outcome.stderr[-3000:]}\nstdout (end):\n{outcome.stdout[-1500:]}")
