"""A short fixed-seed run of bench/fuzz.py: every mutated input gets a clean answer.

The campaign runs once per session in a subprocess (the fuzzer forks workers from a
process that has imported TensorFlow, which a pytest process must not do). Every case
must end as a clean ``RegraftError``, a success with the original values, or a success
with other values that the format cannot notice (HDF5 has no checksums).

``KNOWN`` lists the cases of this seed that still fail, each with the issue-13 finding it
reproduces. Each is an xfail(strict=True) test: when the fix lands the case passes, the
test turns red, and its line here should be deleted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 13
CASES = 150
GOOD = {"clean", "ok", "undetectable"}

KNOWN: dict[int, str] = {  # case -> the issue-13 finding it reproduces (item number)
    13: "h5 damaged attribute: OSError (13.3)",  # k3 attr-flip: near byte 2104: flip 2101=200,2134^bit5,
    15: "object-graph node id out of range: other-exc IndexError (13.1)",  # tf object-graph: no-nodes
    19: "h5 bad attribute: KeyError (13.3)",  # k2 attrs: layer_names-missing=7
    28: "h5 missing dataset: KeyError (13.3)",  # k2 groups: drop-group d1/d1
    30: "h5 unreadable dtype: ValueError (13.3)",  # k2 dtype: d2/d2/kernel:0 -> fixed-str
    34: "object-graph node id out of range: other-exc IndexError (13.1)",  # tf object-graph: drop-node
    36: "h5 damaged metadata: KeyError (13.3)",  # k2 byte-flip: flip 9513=231,8877=136,7734=36,9373=128,
    56: "h5 empty dataspace: TypeError (13.3)",  # k3 shape: layers/dense/vars/1 -> empty-space
    65: "h5 unreadable dtype: TypeError (13.3)",  # k2 dtype: d2/d2/bias:0 -> compound
    82: "h5 damaged attribute: RuntimeError (13.3)",  # k3 attr-flip: near byte 1872: flip 1844^bit0
    83: "h5 damaged attribute: OSError (13.3)",  # k3 attr-flip: near byte 13584: flip 13621^bit0,13639=1
    95: "h5 damaged attribute: KeyError (13.3)",  # k2 attr-flip: near byte 728: flip 760^bit4,699=224
    104: "h5 unreadable dtype: TypeError (13.3)",  # k3 dtype: layers/dense_1/vars/1 -> opaque
    106: "h5 damaged attribute: KeyError (13.3)",  # k2 attr-flip: near byte 2080: flip 2033^bit1,2133=176
    107: "object-graph node id out of range: other-exc IndexError (13.1)",  # tfk object-graph: drop-node
    111: "h5 damaged attribute: RuntimeError (13.3)",  # k2 attr-flip: near byte 840: flip 835^bit4
    113: "h5 unreadable dtype: ValueError (13.3)",  # k2 dtype: d2/d2/bias:0 -> bytes-obj
    114: "h5 soft link: KeyError (13.3)",  # k2 links: soft-dangling d1/d1/bias:0
    119: "h5 soft link: RuntimeError (13.3)",  # k2 links: soft-loop d1/d1/bias:0
    123: "h5 bad attribute: ValueError (13.3)",  # k3 attrs: layers/dense_1/vars.name=array([], dtype
    139: "h5 damaged attribute: RuntimeError (13.3)",  # k3 attr-flip: near byte 1872: flip 1838=151,1844=168,1
}


@pytest.fixture(scope="module")
def campaign(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fuzz") / "fuzz.json"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), TF_CPP_MIN_LOG_LEVEL="3")
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "fuzz.py"), "--seed", str(SEED), "--cases", str(CASES),
         "--time-limit", "30", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    data["stdout"] = run.stdout
    return data


def test_campaign_ran_every_case_and_printed_its_table(campaign):
    assert campaign["cases"] == CASES
    assert sum(campaign["counts"].values()) == CASES
    assert "kind mutator" in campaign["stdout"] and f"seed {SEED}, {CASES} cases" in campaign["stdout"]
    # the run covered every file kind, and most cases reached a verdict on real bytes
    kinds = {line.split()[0] for line in campaign["stdout"].splitlines()[2:] if line and line[0].isalpha()}
    assert {"tf", "tfk", "k3", "k2", "state", "plan", "rules"} <= kinds
    assert campaign["counts"].get("harness", 0) == 0, [r for r in campaign["non_clean"] if r["cls"] == "harness"]


def test_every_case_gets_a_clean_answer(campaign):
    new = [r for r in campaign["non_clean"] if r["case"] not in KNOWN]
    assert not new, "\n".join(
        f"case {r['case']}: {r['kind']} {r['mutator']} -> {r['cls']} {r.get('exception', '')} "
        f"{r.get('where', '')} [{r.get('note', '')}] (rerun: python bench/fuzz.py --seed {SEED} --only {r['case']})"
        for r in new
    )


@pytest.mark.parametrize("case", sorted(KNOWN), ids=[f"{c}-{KNOWN[c]}" for c in sorted(KNOWN)])
def test_known_finding_is_still_open(campaign, case):
    """Strict xfail: passes (and so fails the suite) once the finding is fixed; then delete its KNOWN line."""
    bad = {r["case"]: r for r in campaign["non_clean"]}
    if case in bad:
        pytest.xfail(f"{KNOWN[case]}: {bad[case]['cls']} {bad[case].get('exception', '')} {bad[case].get('where', '')}")
    pytest.fail(f"case {case} ({KNOWN[case]}) now gets a clean answer: delete it from KNOWN in tests/test_fuzz.py")
