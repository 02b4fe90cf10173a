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
    return write_party_files("counterfact", 4, 4, tmp_path / "parties")


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
    rc = {**BASE, "strategy": "collabedit,simple-average", "results-dir": str(tmp_path),
          "run-name": "deployed"}
    deployed = run_deployed(parties, rc, log_dir=tmp_path / "logs", timeout=1800)
    sim = simulated(tmp_path, {**rc, "run-name": "simulated"})
    for strategy in ("collabedit", "simple-average"):
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


def test_a_supernode_killed_mid_round_and_the_serverapp_killed_mid_run(tmp_path, parties):
    """Round 1: party 3's SuperNode is SIGKILLed while it edits; the round completes with the
    other three (min-clients 3) and records the loss under the party's name. It comes back
    for round 2. Then the ServerApp is SIGKILLed in round 2 and the run resumed: it ends with
    the weights of the uninterrupted run (the simulation with party 3 left out of round 1)."""
    rc = {**BASE, "strategy": "collabedit", "num-server-rounds": 3, "min-clients": 3,
          "round-timeout": 150.0, "results-dir": str(tmp_path), "run-name": "faults"}
    run_dir = tmp_path / "faults"
    with deployment(parties, tmp_path / "logs") as dep:
        submit(dep, rc, stream=False)
        log3 = tmp_path / "logs" / "supernode-3.log"
        wait_for(lambda: log3.exists() and "train" in log3.read_text(errors="replace").lower(),
                 600, "party 3 to receive its round-1 train message")
        dep.kill_node(3)
        ckpt = run_dir / "checkpoint.safetensors"
        wait_for(ckpt.exists, 900, "round 1's checkpoint")
        dep.start_node(3)  # back for the next round
        # the ServerApp dies in round 2 (after round 1's checkpoint), taking nothing with it
        time.sleep(5)
        serverapp = subprocess.run(["pgrep", "-f", "flwr-serverapp"], capture_output=True,
                                   text=True).stdout.split()
        assert serverapp, "no ServerApp process found"
        for pid in serverapp:
            subprocess.run(["kill", "-9", pid], check=False)
        assert ckpt.exists()
        submit(dep, {**rc, "resume": True}, timeout=1800)
    summary = read_summary(run_dir / "summary.json", tmp_path / "logs" / "flwr-run.log")
    rounds = summary["strategies"]["collabedit"]["rounds"]
    assert summary["resumed"]["after_round"] >= 1
    assert [len(r["client_metrics"]) for r in rounds][0] == 3
    lost = rounds[0]["failed"]
    assert lost and all(f["reason"] == "no train reply" for f in lost)
    assert len(rounds[-1]["client_metrics"]) == 4  # party 3 came back
    json.dumps(summary)
