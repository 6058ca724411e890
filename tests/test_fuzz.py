"""A short fixed-seed run of bench/fuzz.py: every mutated input gets a clean answer.

The campaign runs once per session in a subprocess (the fuzzer forks workers from a
process that has imported TensorFlow, which a pytest process must not do). Every case
must end as a clean ``RegraftError``, a success with the original values, or a success
with other values that the format cannot notice (HDF5 has no checksums).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 13
CASES = 400
GOOD = {"clean", "ok", "undetectable"}

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
    new = campaign["non_clean"]
    assert not new, "\n".join(
        f"case {r['case']}: {r['kind']} {r['mutator']} -> {r['cls']} {r.get('exception', '')} "
        f"{r.get('where', '')} [{r.get('note', '')}] (rerun: python bench/fuzz.py --seed {SEED} --only {r['case']})"
        for r in new
    )
