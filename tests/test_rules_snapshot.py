"""Every format's write rules for every sample architecture, pinned exactly: (hub names, format
names, op) in list order, which is the order tensors are written in.

Issue 20 rewrites the rules as named mappings (q/k/v, gate/up, tied embedding, experts); that
refactor must change no rule, so this compares against tests/data/rules_snapshot.json byte for
byte. A deliberate change of rules regenerates it, and the diff is the review:

    PYTHONPATH=src python tests/test_rules_snapshot.py --regen
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from arch_samples import SAMPLES
from weightport.archs import ARCHS
from weightport.errors import WeightportError
from weightport.formats import FORMATS
from weightport.formats.litgpt import litgpt_rules

SNAPSHOT = Path(__file__).parent / "data" / "rules_snapshot.json"
# Nanotron alone stores something that depends on the TP size (a vocabulary padded to a multiple
# of it); 8 makes the idefics3 sample's 131 rows pad further than TP 1's 132
TP_SIZES = {"nanotron": (1, 8)}


def _rows(rules) -> list:
    return [[list(r.hub), list(r.fmt), str(r.op)] for r in rules]


def _variants(fmt, model):
    """(layout, tp, rules thunk) for every way the format can write the model."""
    for layout in (None, *fmt.layouts_for(model)):
        for tp in TP_SIZES.get(fmt.name, (1,)):
            yield layout, tp, lambda layout=layout, tp=tp: fmt.target_rules(model, layout, tp)


def snapshot() -> dict[str, list | dict]:
    """"<format> <sample> <layout> [tp=N]" -> the rule rows, or {"refused": why} when the format
    refuses that layout for that model, or {"same_as": key} when it equals an earlier entry of the
    same format and sample (the default layout is one of the named ones: stored once)."""
    out = {}
    for fmt in FORMATS.values():
        for sample, model in SAMPLES.items():
            if model.arch.name not in fmt.archs:  # read-only archs (xtuner's llava) have no target rules
                continue
            seen = {}
            variants = list(_variants(fmt, model))
            if fmt.name == "litgpt":  # the lit-gpt <= 0.5.4 layout is read, never written
                variants.append(("legacy", 1, lambda: litgpt_rules(model, legacy=True)))
            for layout, tp, rules in variants:
                key = f"{fmt.name} {sample} {layout or 'default'}" + (f" tp={tp}" if tp != 1 else "")
                try:
                    entry = _rows(rules())
                except WeightportError as e:
                    entry = {"refused": str(e)}
                text = json.dumps(entry)
                out[key] = {"same_as": seen[text]} if text in seen else entry
                seen.setdefault(text, key)
    return out


def dumps(snap: dict) -> str:
    """JSON with one rule per line, so a changed rule is one line of diff."""
    lines = ["{"]
    for i, (key, entry) in enumerate(snap.items()):
        end = "," if i < len(snap) - 1 else ""
        if isinstance(entry, dict):
            lines.append(f"  {json.dumps(key)}: {json.dumps(entry)}{end}")
            continue
        lines.append(f"  {json.dumps(key)}: [")
        lines += [f"    {json.dumps(row)}" + ("," if j < len(entry) - 1 else "") for j, row in enumerate(entry)]
        lines.append(f"  ]{end}")
    return "\n".join(lines + ["}"]) + "\n"


def test_every_architecture_has_a_sample():
    assert {m.arch.name for m in SAMPLES.values()} == set(ARCHS)


def test_op_strings_are_deterministic():
    """No object address in an op's text (a default object repr), or the snapshot could not hold."""
    text = dumps(snapshot())
    assert " at 0x" not in text and "object at" not in text


def test_rules_match_the_snapshot():
    got = dumps(snapshot())
    want = SNAPSHOT.read_text(encoding="utf-8")
    if got != want:  # name the first entries that differ rather than printing the whole file
        new, old = json.loads(got), json.loads(want)
        differ = [k for k in new.keys() | old.keys() if new.get(k) != old.get(k)]
        what = f"{len(differ)} rule sets differ (e.g. {sorted(differ)[:5]})" if differ else "entries are reordered"
        raise AssertionError(f"{SNAPSHOT.name}: {what}; "
                             "if the change is meant, run `python tests/test_rules_snapshot.py --regen` "
                             "and review the diff")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regen"]:
        sys.exit("usage: python tests/test_rules_snapshot.py --regen")
    SNAPSHOT.parent.mkdir(exist_ok=True)
    SNAPSHOT.write_text(dumps(snapshot()), encoding="utf-8")
    print(f"wrote {SNAPSHOT}")
