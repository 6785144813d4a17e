"""Run every hostile case of tests/hostile_cases.py (the code tests/test_hostile_cases.py runs) and
rewrite the table in docs/reliability.md between its hostile-cases markers.

    .venv/bin/python scripts/hostile_table.py            # run, rewrite the doc; exit 1 if a case fails
    .venv/bin/python scripts/hostile_table.py --check    # run and print, leave the doc alone
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hostile_cases import CASES, Fixtures, expected_text, run_case  # noqa: E402

DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- hostile-cases:begin -->", "<!-- hostile-cases:end -->"


def cell(text: str, code: bool = False) -> str:
    """Text for one table cell: on one line, pipes escaped, in a code span when asked."""
    text = " ".join(text.split()).replace("|", "\\|")
    return f"`{text.replace('`', chr(39))}`" if code and text else text


def split_code(shown: str) -> str:
    """'exit 1: weightport: error: ...' as 'exit 1: `weightport: error: ...`'."""
    head, _, line = shown.partition(": ")
    return f"{head}: {cell(line, code=True)}" if line else cell(shown)


def table(outcomes, seconds: float) -> str:
    passed = sum(o.passed for o in outcomes)
    counts = Counter(o.case.category for o in outcomes)
    by_category = ", ".join(f"{name} {n}" for name, n in counts.items())
    succeed = sum(o.case.code == 0 for o in outcomes)
    lines = [
        f"{len(outcomes)} cases, {passed} passed, {len(outcomes) - passed} failed "
        f"({succeed} of them the allowed way, expected to succeed; {seconds:.0f} s on this machine). "
        f"By category: {by_category}.",
        "",
        "Paths are shortened to the names the cases give them: `SRC`, `OUT`, `ADAPTER`, ..., and `T` for the case's "
        "temporary directory. The expected line is exact unless it ends in `…` (a stable prefix).",
        "",
        "| # | category | what the user does | expected | observed | result |",
        "|---:|---|---|---|---|---|",
    ]
    for i, o in enumerate(outcomes, 1):
        lines.append(f"| {i} | {cell(o.case.category)} | {cell(o.case.does)} | {split_code(expected_text(o.case))} | "
                     f"{split_code(o.observed)} | {'pass' if o.passed else '**FAIL**'} |")
    return "\n".join(lines)


def rewrite(doc: Path, body: str) -> None:
    text = doc.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc}: no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{body}\n{END}{tail}", encoding="utf-8")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="run and print failures; do not rewrite the doc")
    p.add_argument("--doc", type=Path, default=DOC)
    args = p.parse_args()
    start = time.monotonic()
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="weightport-hostile-") as tmp:
        fx = Fixtures(Path(tmp) / "fixtures")
        for i, case in enumerate(CASES):
            o = run_case(case, fx, Path(tmp) / "cases" / f"{i:03d}")
            outcomes.append(o)
            if not o.passed:
                print(f"FAIL {case.id}: {o.observed}\n  " + "\n  ".join(o.failures), file=sys.stderr)
    seconds = time.monotonic() - start
    failed = [o for o in outcomes if not o.passed]
    print(f"{len(outcomes)} cases, {len(outcomes) - len(failed)} passed, {len(failed)} failed, {seconds:.0f} s")
    if not args.check:
        rewrite(args.doc, table(outcomes, seconds))
        print(f"rewrote {args.doc}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
