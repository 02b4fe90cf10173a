"""The protocol end to end over an in-process grid on a tiny float64 Llama: factored and dense
payloads give the same merges, the factored message is a function of the dense one, malformed
factors are left out, and a client that does not share the server's templates or C0 refuses."""

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

import clients.client_app as client_app
import sim.server_app as server_app
from editing.memit import context_templates, edit
from editing.workspace import workspace_for
from sim.config import RunConfig, split_requests
from sim.inprocess import InProcessGrid
from strategies import payload
from tests.sim.test_app import rel, run, run_config

PRIVATE = "collabedit,simple-average,task-arithmetic,ties"


def final_deltas(grid, strategies):
    """The merged model each strategy sent its clients for evaluation (4 clients each)."""
    evals = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    n = len(evals) // len(strategies)
    return {name: payload.decode_deltas(evals[i * n].content["global"])
            for i, name in enumerate(strategies)}


def test_factored_and_dense_payloads_give_the_same_merge_for_every_strategy(tiny, tmp_path):
    names = PRIVATE.split(",")
    _, dense_grid = run(tmp_path, strategy=PRIVATE, **{"payload": "dense"})
    _, factored_grid = run(tmp_path, strategy=PRIVATE)
    _, f32_grid = run(tmp_path, strategy="collabedit", **{"payload-dtype": "float32"})
    dense, factored = final_deltas(dense_grid, names), final_deltas(factored_grid, names)
    for name in names:
        for layer in (1, 2):
            assert rel(factored[name][layer], dense[name][layer]) <= 1e-10, (name, layer)
    f32 = final_deltas(f32_grid, ["collabedit"])["collabedit"]
    assert 0 < rel(f32[1], dense["collabedit"][1]) <= 1e-4  # float32 rounding, measured
    # the factored messages really are smaller
    up = [sum(payload.nbytes(r.content["payload"]) for r in g.received if "payload" in r.content)
          for g in (dense_grid, factored_grid)]
    assert up[1] * 5 < up[0]


def test_factored_message_is_recomputed_from_the_dense_payload_alone(tiny, tmp_path):
    _, grid = run(tmp_path, strategy="collabedit")
    cfg = RunConfig.from_flower(run_config(tmp_path))
    replies = {int(r.content["metrics"]["partition-id"]): payload.decode(r.content["payload"])
               for r in grid.received if "payload" in r.content}
    cov = tiny.covariance()
    for pid, sent in replies.items():
        layers = edit(tiny.lm, split_requests(cfg, 4)[pid][0], tiny.hp, cov, mode="parallel",
                      templates=tiny.templates).layers
        for layer, fields in sent.items():
            dense = {"kkt": layers[layer].kkt.numpy(), "rkt": layers[layer].rkt.numpy()}
            again = payload.factor_layer(dense)
            assert set(again) == set(fields) == {"kkt-factor", "rkt-factor"}
            for f in fields:
                np.testing.assert_allclose(fields[f], again[f], rtol=0, atol=1e-12 * np.abs(
                    again[f]).max())


class FaultyFactorGrid(InProcessGrid):
    """Client 1: NaN in a factor; 2: a kkt-factor with a row missing; 3: R K^T's factor with
    another rank than K K^T's; 4: rank above its number of edits (1). Client 0 is fine."""

    def pull_messages(self, message_ids):
        for reply in super().pull_messages(message_ids):
            pid = reply.content["metrics"]["partition-id"] if reply.has_content() else None
            if reply.has_content() and "payload" in reply.content and pid:
                arrays = payload.decode(reply.content["payload"])
                f = arrays[1]
                if pid == 1:
                    f["kkt-factor"] = f["kkt-factor"].copy()
                    f["kkt-factor"][3, 0] = np.nan
                elif pid == 2:
                    f["kkt-factor"] = f["kkt-factor"][:-1]
                elif pid == 3:
                    f["rkt-factor"] = np.concatenate([f["rkt-factor"], f["rkt-factor"]], 1)
                elif pid == 4:
                    extra = np.random.default_rng(0).standard_normal((f["kkt-factor"].shape[0], 1))
                    f["kkt-factor"] = np.concatenate([f["kkt-factor"], extra], axis=1)
                    f["rkt-factor"] = np.concatenate([f["rkt-factor"], f["rkt-factor"][:, :1]], 1)
                records = {f"{l}.{k}": Array(np.ascontiguousarray(v)) for l, fs in arrays.items()
                           for k, v in fs.items()}
                reply.content = RecordDict({"payload": ArrayRecord(records),
                                            "metrics": reply.content["metrics"]})
            yield reply


def test_malformed_factored_payloads_are_left_out(tiny, tmp_path):
    summary, _ = run(tmp_path, clients=5, grid_cls=FaultyFactorGrid, strategy="collabedit",
                     **{"edits-per-client": 1})
    rnd = summary["strategies"]["collabedit"]["rounds"][0]
    reasons = {f["client"]: f["reason"] for f in rnd["failed"]}
    assert set(reasons) == {"client 1", "client 2", "client 3", "client 4"}
    assert "NaN" in reasons["client 1"] and "'kkt-factor'" in reasons["client 1"]
    assert "rows" in reasons["client 2"]
    assert "rank 2 != rank 1" in reasons["client 3"] and "'rkt-factor'" in reasons["client 3"]
    assert "rank 2 > 1" in reasons["client 4"] and "'kkt-factor'" in reasons["client 4"]
    assert list(rnd["bytes_up"]) == ["client 0"]


def other_workspace(ws, **changes):
    """A client's own workspace: a separate object built the way every party builds one."""
    kw = dict(layers="1-2", mom2_update_weight=0.5, v_num_grad_steps=5,
              moments={l: m.clone() for l, m in ws.second_moments.items()})
    kw.update({k: v for k, v in changes.items() if k != "templates"})
    mine = workspace_for(ws.lm, **kw)
    mine.templates = changes.get("templates", [list(t) for t in ws.templates])
    return mine


class PerClientWorkspaceGrid(InProcessGrid):
    """Each client reads its own workspace (node 100 + pid -> workspaces[pid])."""

    workspaces: dict = {}

    def pull_messages(self, message_ids):
        for mid in list(message_ids):
            msg = self._queue.get(mid)
            if msg is not None:
                pid = msg.metadata.dst_node_id - 100
                client_app.workspace = lambda cfg, ws=self.workspaces[pid]: ws
            yield from super().pull_messages([mid])


@pytest.mark.parametrize("mismatch,reason", [
    ("templates", "context templates differ"),
    ("c0", "C0 fingerprint differs in sample-size: 500 here, 1000 there"),
    ("lam", "C0 fingerprint differs in lam"),
])
def test_a_client_that_disagrees_with_the_server_is_left_out(tiny, tmp_path, monkeypatch,
                                                             mismatch, reason):
    monkeypatch.setattr(client_app, "workspace", client_app.workspace)  # restored afterwards
    good = [other_workspace(tiny) for _ in range(3)]
    assert all(w is not tiny and w.agreement() == tiny.agreement() for w in good)
    bad = {"templates": lambda: other_workspace(tiny, templates=context_templates(tiny.lm, 2, 5)),
           "c0": lambda: dataclasses.replace(other_workspace(tiny), c0_fingerprint={
               **tiny.c0_fingerprint, "sample-size": 500}),
           "lam": lambda: other_workspace(tiny, mom2_update_weight=0.7)}[mismatch]()
    PerClientWorkspaceGrid.workspaces = {0: good[0], 1: bad, 2: good[1], 3: good[2]}
    summary, _ = run(tmp_path, grid_cls=PerClientWorkspaceGrid)
    rnd = summary["strategies"]["collabedit"]["rounds"][0]
    # the reply is an error (no metrics to name its partition): the query answer names it
    assert [f["client"] for f in rnd["failed"]] == ["client 1"]  # named by its query reply
    assert reason in rnd["failed"][0]["reason"]
    assert "client 1 refuses" in rnd["failed"][0]["reason"]
    assert sorted(rnd["bytes_up"]) == ["client 0", "client 2", "client 3"]


def test_agreeing_clients_with_their_own_workspaces_equal_global(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(client_app, "workspace", client_app.workspace)
    PerClientWorkspaceGrid.workspaces = {i: other_workspace(tiny) for i in range(4)}
    summary, _ = run(tmp_path, grid_cls=PerClientWorkspaceGrid)
    assert max(summary["collabedit_vs_global_rel_diff"].values()) <= 1e-8
    assert summary["strategies"]["collabedit"]["rounds"][0]["failed"] == []


def test_merge_error_is_recorded_before_the_run_stops(tiny, tmp_path, monkeypatch):
    from strategies.flower import CollabEditStrategy
    from strategies.merge import MergeError

    # a C of zeros plus two rank-2 clients: C + sum K K^T is singular
    monkeypatch.setattr(CollabEditStrategy, "covariance",
                        lambda self, layer: np.zeros((self.shapes[layer][1],) * 2))
    with pytest.raises(MergeError, match="layer 1"):
        run(tmp_path, clients=2, strategy="collabedit")
    import json

    on_disk = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert "not positive definite" in on_disk["error"] and "finished" not in on_disk


class CountingGrid(InProcessGrid):
    """Records how many message ids each pull asks for."""

    asked: list = []

    def pull_messages(self, message_ids):
        CountingGrid.asked.append(len(message_ids))
        yield from super().pull_messages(message_ids)


def test_replies_are_pulled_one_at_a_time(tiny, tmp_path):
    CountingGrid.asked = []
    run(tmp_path, grid_cls=CountingGrid, strategy="collabedit")
    assert CountingGrid.asked and set(CountingGrid.asked) == {1}


@pytest.mark.parametrize("form", ["factored", "dense"])
def test_dynamic_covariance_broadcasts_past_kkt_in_the_payload_form(tiny, tmp_path, form):
    summary, grid = run(tmp_path, clients=2, **{"num-server-rounds": 2, "beta1": 0.5,
                                                "payload": form})
    assert max(summary["collabedit_vs_global_rel_diff"].values()) <= 1e-8
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    past = payload.decode(trains[-1].content["past-kkt"])
    d_in = tiny.lm.model.config.intermediate_size
    # round 1: 2 clients x 2 edits, summed as a factor of rank 4 (or packed, dense)
    assert {tuple(v.shape) for f in past.values() for v in f.values()} == (
        {(d_in, 4)} if form == "factored" else {(d_in * (d_in + 1) // 2,)})


def test_server_builds_one_layers_dense_arrays_at_a_time(tiny, tmp_path, monkeypatch):
    """Factored replies are kept compact while they are folded; each layer's C (and with it
    C + sum K K^T and R K^T's sum) is built only at that layer's solve, after the previous one."""
    from strategies.flower import CollabEditStrategy
    from strategies.merge import CollabEdit

    events = []
    covariance, result = CollabEditStrategy.covariance, CollabEdit._result

    class EventGrid(InProcessGrid):
        def pull_messages(self, message_ids):
            for reply in super().pull_messages(message_ids):
                if reply.metadata.message_type != "query":  # who-are-you answers, no payload
                    events.append("reply")
                yield reply

    def traced_cov(self, layer):
        events.append(f"C {layer}")
        return covariance(self, layer)

    def traced_result(self):
        out = result(self)
        events.append(f"solved {self.name}")
        return out

    monkeypatch.setattr(CollabEditStrategy, "covariance", traced_cov)
    monkeypatch.setattr(CollabEdit, "_result", traced_result)
    run(tmp_path, grid_cls=EventGrid, strategy="collabedit")
    train = events[:events.index("solved layer 2") + 1]
    assert train == ["reply"] * 4 + ["C 1", "solved layer 1", "C 2", "solved layer 2"]
