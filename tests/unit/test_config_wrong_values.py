"""Every key of the pre-training config and of each objective, given values wrong by type (and the
numbers out of range), is refused as ``launch local`` refuses a stage before any process starts: a
ConfigError naming the key, nothing written, within a memory and time bound (tests/wrong_values.py).

A huge number (10**12) may also be accepted where it is a valid, if absurd, setting (a learning rate,
a number of steps); what it may not do is crash the checks or make them build something too large
to hold, as ``model.kwargs={depth: 1000000}`` once grew the checks to 12 GB before any message."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

from tests.conftest import REPO, python_env
from tests.wrong_values import CASE_SECONDS, KWARGS, OUT_OF_RANGE, cases


def test_every_key_refuses_wrong_values_naming_it(digits_dir, tmp_path):
    run_dir, out = tmp_path / "never", tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-m", "tests.wrong_values", str(digits_dir), str(run_dir), str(out)],
                          cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=20 * CASE_SECONDS + 600)
    assert done.returncode == 0, done.stderr[-5000:]
    results = json.loads(out.read_text())
    assert len(results) == len(cases()) > 400  # every key of Config and of every objective's config
    assert not run_dir.exists(), "a check wrote the run dir"
    wrong = [r for r in results if r["outcome"] != "named"
             and not (r["outcome"] == "accepted" and r["value"] == OUT_OF_RANGE[1])]
    assert not wrong, "\n".join(f"{r['key']}={r['value']} ({r['objective']}): {r['outcome']}: {r['detail']}"
                                for r in wrong)
    kwargs = {r["value"]: r["outcome"] for r in results if r["key"] == "model.kwargs"}
    assert kwargs == dict.fromkeys(KWARGS, "named")
    assert Counter(r["outcome"] for r in results)["named"] > 400
