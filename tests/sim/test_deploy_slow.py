"""A local deployment on real processes (SuperLink, one SuperNode per party file, loopback):
the same merged weights as the simulation, a SuperNode killed mid-round, the ServerApp killed
mid-run and resumed (slow; CI runs it). SmolLM2 on real CounterFact records."""

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import sim.server_app as server_app
from sim.config import RunConfig
from sim.deploy import deployment, party_files, run_deployed, submit, write_party_files
from sim.inprocess import InProcessGrid
from sim.launch import read_summary

pytestmark = pytest.mark.slow

BASE = {"dataset": "counterfact", "edits-per-client": 2, "edit-mode": "parallel",
        "save-deltas": True, "round-timeout": 900.0}


@pytest.fixture
def parties(tmp_path, shared_data):
    """write(n, per_party): each party's file holds exactly its simulated partition."""
    return lambda n, per_party: write_party_files("counterfact", n, per_party, tmp_path / "parties")


def simulated(tmp_path, rc: dict, clients: int = 4) -> dict:
    """The same run config in the in-process simulation (requests from the shared dataset)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each deployed party runs
    try:
        rc = {**rc, "requests-from": "dataset", "results-dir": str(tmp_path / "sim")}
        return server_app.run(InProcessGrid(clients, rc), RunConfig.from_flower(rc))
    finally:
        torch.set_num_threads(threads)


def deltas(summary: dict, strategy: str) -> dict:
    return load_file(str(Path(summary["path"]).with_name(f"deltas-{strategy}.safetensors")))


def max_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k])) for k in a)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_deployment_with_party_files_merges_as_the_simulation_does(tmp_path, parties):
    rc = {**BASE, "strategy": "collabedit", "results-dir": str(tmp_path), "run-name": "deployed"}
    deployed = run_deployed(parties(4, 2), rc, log_dir=tmp_path / "logs", timeout=1800)
    sim = simulated(tmp_path, {**rc, "run-name": "simulated"})
    for strategy in ("collabedit",):
        gap = max_rel(deltas(deployed, strategy), deltas(sim, strategy))
        print(strategy, "deployed vs simulated, largest relative difference", gap)
        assert gap <= 1e-6
        got = deployed["strategies"][strategy]["rounds"][-1]
        want = sim["strategies"][strategy]["rounds"][-1]
        assert got["metrics"]["n"] == want["metrics"]["n"] == 8
        assert got["metrics"]["es"] == pytest.approx(want["metrics"]["es"])
        assert got["failed"] == []
        # the server learned each party's request count from its reply alone
        assert sorted(m[0]["num-edits"] for m in got["client_metrics"].values()) == [2] * 4
    assert deployed["config"]["requests-from"] == "node"


def test_a_supernode_killed_mid_round_and_the_serverapp_killed_mid_run(tmp_path, parties):
    """Round 1: party 2's SuperNode is SIGKILLed once its train message arrived; the round
    completes with the other two (min-clients 2) and records the loss under the party's name.
    It comes back, and the ServerApp is SIGKILLed after round 1's checkpoint; the run is
    resumed on the same SuperLink and ends round 2 with all three parties."""
    rc = {**BASE, "strategy": "collabedit", "num-server-rounds": 2, "min-clients": 2,
          "round-timeout": 300.0, "results-dir": str(tmp_path), "run-name": "faults"}
    run_dir = tmp_path / "faults"
    ckpt = run_dir / "checkpoint.safetensors"
    with deployment(parties(3, 4), tmp_path / "logs") as dep:
        submit(dep, rc, stream=False)
        log2 = tmp_path / "logs" / "supernode-2.log"
        wait_for(lambda: "train message" in log2.read_text(errors="replace"), 600,
                 "party 2 to receive its round-1 train message")
        dep.kill_node(2)
        wait_for(ckpt.exists, 900, "round 1's checkpoint")
        dep.start_node(2)  # back for the next round
        serverapp = subprocess.run(["pgrep", "-f", "flwr-serverapp"], capture_output=True,
                                   text=True).stdout.split()
        assert serverapp, "no ServerApp process found"
        for pid in serverapp:
            subprocess.run(["kill", "-9", pid], check=False)
        submit(dep, {**rc, "resume": True}, timeout=1800)
    summary = read_summary(run_dir / "summary.json", tmp_path / "logs" / "flwr-run.log")
    print(json.dumps({k: summary[k] for k in ("resumed", "num_clients")}))
    rounds = summary["strategies"]["collabedit"]["rounds"]
    assert summary["resumed"] == {"finished": [], "strategy": "collabedit", "after_round": 1}
    assert len(rounds) == 2
    assert sorted(rounds[0]["client_metrics"]) == ["client 0", "client 1"]
    assert [f["client"] for f in rounds[0]["failed"]][:1] == ["client 2"]
    print("round 1 failures:", rounds[0]["failed"])
    assert sorted(rounds[1]["client_metrics"]) == ["client 0", "client 1", "client 2"]
    assert rounds[1]["metrics"]["n"] == 3 * 4  # every party scores all it asked for
