"""Parties with request files of their own (requests-from="node"), over an in-process grid on the
tiny model: the same merge as the shared-dataset split, and bad files stopping only their party,
named with the file and record."""

import json

import numpy as np
import pytest
from flwr.app import Context, RecordDict

import editing.data as data
import sim.config as config
import sim.server_app as server_app
from sim.config import RunConfig
from sim.inprocess import InProcessGrid
from strategies.flower import one_line
from tests.sim.conftest import REQUESTS


def rome_record(r) -> dict:
    return {"case_id": int(r.case_id),
            "requested_rewrite": {"prompt": r.prompt, "subject": r.subject,
                                  "target_new": {"str": r.target_new},
                                  "target_true": {"str": r.target_true}, "relation_id": "P0"},
            "paraphrase_prompts": list(r.paraphrase_prompts),
            "neighborhood_prompts": list(r.neighborhood_prompts)}


def node_grid(n: int, rc: dict, files: list) -> InProcessGrid:
    grid = InProcessGrid(n, rc)
    for node, path in zip(sorted(grid.contexts), files):
        ctx = grid.contexts[node]
        grid.contexts[node] = Context(run_id=1, node_id=node, state=RecordDict(), run_config=rc,
                                      node_config={**ctx.node_config, "requests-path": str(path)})
    return grid


def rc(tmp_path, **kw):
    return {"strategy": "collabedit,task-arithmetic", "edits-per-client": 2, "num-server-rounds": 2,
            "dataset": "counterfact", "results-dir": str(tmp_path), "run-name": "p",
            "save-deltas": True, **kw}


@pytest.fixture
def files(tiny, tmp_path, monkeypatch):
    """Party i's file holds what the shared split gives partition i (REQUESTS 4i..4i+3)."""
    monkeypatch.setattr(config, "load_requests", data.load_requests)  # real files from here on
    paths = []
    for i in range(2):
        path = tmp_path / f"party-{i}.json"
        path.write_text(json.dumps([rome_record(r) for r in REQUESTS[4 * i:4 * i + 4]]))
        paths.append(path)
    return paths


def test_parties_reading_their_own_files_merge_as_the_shared_split(tiny, tmp_path, files,
                                                                    monkeypatch):
    mine = rc(tmp_path / "node", **{"requests-from": "node"})
    by_node = server_app.run(node_grid(2, mine, files), RunConfig.from_flower(mine))
    monkeypatch.setattr(config, "load_requests", lambda *a, **k: REQUESTS[: k.get("limit")])
    shared = rc(tmp_path / "shared")
    by_split = server_app.run(InProcessGrid(2, shared), RunConfig.from_flower(shared))
    from safetensors.numpy import load_file
    for name in ("collabedit", "task-arithmetic"):
        a = load_file(str(tmp_path / "node" / "p" / f"deltas-{name}.safetensors"))
        b = load_file(str(tmp_path / "shared" / "p" / f"deltas-{name}.safetensors"))
        assert a.keys() == b.keys() == {"1", "2"}
        for k in a:
            assert np.array_equal(a[k], b[k])
        assert by_node["strategies"][name]["rounds"][-1]["metrics"]["n"] == 8
    assert by_node["config"]["requests-from"] == "node"


@pytest.mark.parametrize("problem, message", [
    ("missing", "does not exist"),
    ("empty", "holds no records"),
    ("malformed", "record 1 .*missing key 'requested_rewrite.subject'"),
    ("short", "3 usable counterfact records; 2 round\\(s\\) of 2 edits need 4"),
])
def test_a_bad_party_file_stops_that_party_alone_naming_file_and_record(tiny, tmp_path, files,
                                                                        problem, message):
    bad = files[1]
    if problem == "missing":
        bad = tmp_path / "nowhere.json"
    elif problem == "empty":
        bad.write_text("[]")
    elif problem == "malformed":
        records = json.loads(bad.read_text())
        del records[1]["requested_rewrite"]["subject"]
        bad.write_text(json.dumps(records))
    else:
        bad.write_text(json.dumps(json.loads(bad.read_text())[:3]))
    mine = rc(tmp_path, **{"requests-from": "node", "strategy": "collabedit"})
    summary = server_app.run(node_grid(2, mine, [files[0], bad]), RunConfig.from_flower(mine))
    for r in summary["strategies"]["collabedit"]["rounds"]:
        assert sorted(r["client_metrics"]) == ["client 0"]  # the round went on without it
        train_fail = [f for f in r["failed"] if not f["reason"].startswith("evaluate")][0]
        assert train_fail["client"] == "client 1"
        assert "\n" not in train_fail["reason"]
        import re
        assert re.search(message, train_fail["reason"]), train_fail["reason"]
        if problem != "missing":
            assert str(bad) in train_fail["reason"]


def test_global_is_refused_when_parties_keep_their_requests():
    with pytest.raises(ValueError, match='"global" edits every request on the server'):
        RunConfig.from_flower({"requests-from": "node", "strategy": "global,collabedit"})


def test_remote_tracebacks_come_down_to_one_line():
    ray = ("\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1, ip=1)\n"
           "Traceback (most recent call last):\n  File \"x.py\", line 3, in train\n"
           "    raise RuntimeError('boom')\nRuntimeError: client 2: failure drill\n")
    assert one_line("client 2 failed: " + ray) == (
        "client 2 failed: ray::ClientAppActor.run() (pid=1, ip=1) RuntimeError: client 2: failure drill")
    assert one_line("two\nlines") == "two lines"
