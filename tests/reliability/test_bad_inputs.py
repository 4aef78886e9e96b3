"""The bad-input corpus (tests/reliability/corpus.py): each case is its own test, and one summary test
runs them all and prints how each ended."""
from __future__ import annotations

import collections
import importlib.util
import sys
from pathlib import Path

import pytest


def _load_corpus():
    # pytest runs with --import-mode=importlib, so a sibling module is loaded by path.
    name = "mskjax_reliability_corpus"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("corpus.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


corpus = _load_corpus()
Outcome, all_cases, run_case = corpus.Outcome, corpus.all_cases, corpus.run_case

CASES = all_cases()
MIN_CASES = 50


def _param(case):
    marks = [pytest.mark.xfail(strict=True, reason=case.known_gap)] if case.known_gap else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_case(case, tmp_path):
    outcome = run_case(case, tmp_path)
    assert outcome.ok, f"{case.id}: expected {case.expect}, ended {outcome.ended}: {outcome.detail}"


def _table(outcomes: list[Outcome]) -> str:
    width = max(len(o.case.id) for o in outcomes)
    lines = [f"{'case':<{width}}  {'group':<7}  {'expected':<8}  {'ended':<13}  {'s':>5}  detail",
             "-" * (width + 60)]
    for o in outcomes:
        mark = "" if o.ok else ("  <- KNOWN GAP" if o.case.known_gap else "  <- FAIL")
        detail = o.detail.splitlines()[0][:110] if o.detail else ""
        lines.append(f"{o.case.id:<{width}}  {o.case.group:<7}  {o.case.expect:<8}  {o.ended:<13}  "
                     f"{o.seconds:5.2f}  {detail}{mark}")
    return "\n".join(lines)


def test_corpus_summary(tmp_path):
    outcomes = [run_case(c, tmp_path / c.id) for c in CASES]
    table = _table(outcomes)
    endings = collections.Counter(o.ended for o in outcomes)
    gaps = [o for o in outcomes if o.case.known_gap]
    print(f"\n{len(outcomes)} bad-input cases tried: " + ", ".join(f"{k}={v}" for k, v in endings.most_common()))
    print(table)
    if gaps:
        print(f"\n{len(gaps)} known gaps (fixes requested in files this suite does not own):")
        for o in gaps:
            print(f"  {o.case.id}: ended {o.ended}: {o.case.known_gap}")
    assert len(outcomes) >= MIN_CASES, f"only {len(outcomes)} cases"
    bad = [o for o in outcomes if not o.ok and not o.case.known_gap]
    assert not bad, f"{len(bad)} case(s) ended badly:\n{table}"
    fixed = [o.case.id for o in gaps if o.ok]
    assert not fixed, f"known gaps now pass, drop their known_gap: {fixed}"
