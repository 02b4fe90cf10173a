"""The app under the real Flower runtime (own SuperLink, Ray), 4 clients, SmolLM2 and real
CounterFact records (slow; CI runs it)."""

import pytest

from sim.launch import flower_run

pytestmark = pytest.mark.slow


def test_flwr_run_collabedit_matches_global_and_beats_simple_average(tmp_path):
    summary = flower_run({"strategy": "global,collabedit,simple-average", "dataset": "counterfact",
                          "edits-per-client": 8, "num-server-rounds": 1, "edit-mode": "parallel",
                          "results-dir": str(tmp_path), "run-name": "slow"},
                         clients=4, cpus_per_client=1, timeout=1800)
    last = {name: s["rounds"][-1] for name, s in summary["strategies"].items()}
    score = {name: r["metrics"]["score"] for name, r in last.items()}
    print(score, summary["collabedit_vs_global_rel_diff"])
    assert abs(score["collabedit"] - score["global"]) <= 1.0
    assert score["collabedit"] >= score["simple-average"] + 5
    assert max(summary["collabedit_vs_global_rel_diff"].values()) < 1e-6
    for r in last.values():
        assert r["failed"] == []
    assert len(last["collabedit"]["bytes_up"]) == 4
