"""Checkpoint and resume of the ServerApp (sim/checkpoint.py) over an in-process grid, and
replies that come too late: a run killed between rounds resumes to the very weights of an
uninterrupted one."""

import time

import numpy as np
import pytest
from flwr.app import MessageType

import sim.server_app as server_app
from sim import checkpoint
from sim.config import RunConfig
from sim.inprocess import InProcessGrid
from strategies import payload


class Crash(Exception):
    """Stands in for the ServerApp process dying."""


def rc(tmp_path, **kw):
    base = {"strategy": "global,collabedit,task-arithmetic", "edits-per-client": 1,
            "num-server-rounds": 3, "beta1": 1.0, "edit-mode": "parallel", "protocol": "one-shot",
            "results-dir": str(tmp_path), "run-name": "r", "dataset": "demo"}
    base.update(kw)
    return base


def crashing_grid(after_train_pushes: int):
    class Grid(InProcessGrid):
        pushes = 0

        def push_messages(self, messages):
            if messages and messages[0].metadata.message_type == MessageType.TRAIN:
                type(self).pushes += 1
                if type(self).pushes > after_train_pushes:
                    raise Crash
            return super().push_messages(messages)
    return Grid


def finals(grid) -> dict[str, dict[int, np.ndarray]]:
    """Per strategy (in run order), the global deltas of its last evaluation."""
    evals = [m for m in grid.sent if m.metadata.message_type == MessageType.EVALUATE]
    return [payload.decode_deltas(m.content["global"]) for m in evals]


def test_a_run_killed_mid_way_resumes_to_the_weights_of_an_uninterrupted_one(tiny, tmp_path):
    whole_grid = InProcessGrid(2, rc(tmp_path / "a"))
    whole = server_app.run(whole_grid, RunConfig.from_flower(rc(tmp_path / "a")))
    # killed as collabedit's round 3 begins: global is done, collabedit has rounds 1-2
    grid = crashing_grid(after_train_pushes=2)(2, rc(tmp_path / "b"))
    with pytest.raises(Crash):
        server_app.run(grid, RunConfig.from_flower(rc(tmp_path / "b")))
    ckpt = tmp_path / "b" / "r" / checkpoint.FILE
    state = checkpoint.load(ckpt, RunConfig.from_flower(rc(tmp_path / "b")).to_dict(), 2)
    assert list(state.done) == ["global"] and state.current.strategy == "collabedit"
    assert state.current.round == 2 and set(state.current.past_kkt) == {1, 2}

    again = InProcessGrid(2, rc(tmp_path / "b", resume=True))
    resumed = server_app.run(again, RunConfig.from_flower(rc(tmp_path / "b", resume=True)))
    assert resumed["resumed"] == {"finished": ["global"], "strategy": "collabedit",
                                  "after_round": 2}
    # the resumed process ran collabedit's round 3 and all of task-arithmetic, nothing else
    trains = [m for m in again.sent if m.metadata.message_type == MessageType.TRAIN]
    assert {int(m.content["config"]["server-round"]) for m in trains[:2]} == {3}
    assert len(trains) == 2 + 3 * 2
    # bitwise: the same final weights for every strategy, and the same per-round metrics
    want = finals(whole_grid)
    got = finals(again)  # collabedit's round 3 (2 clients), then task-arithmetic's 3 rounds
    assert len(want) == 3 * 3 * 2 and len(got) == 2 + 3 * 2
    for w, g in zip((want[3 * 2 * 2 - 1], want[-1]), (got[1], got[-1])):
        for layer in w:
            assert np.array_equal(w[layer], g[layer])
    assert resumed["collabedit_vs_global_rel_diff"] == whole["collabedit_vs_global_rel_diff"]
    for name in ("global", "collabedit", "task-arithmetic"):
        assert ([r["metrics"] for r in resumed["strategies"][name]["rounds"]] ==
                [r["metrics"] for r in whole["strategies"][name]["rounds"]])
    assert not ckpt.exists()  # a finished run keeps its summary, not its checkpoint


def test_a_checkpoint_of_another_config_is_refused_naming_the_difference(tiny, tmp_path):
    grid = crashing_grid(after_train_pushes=1)(2, rc(tmp_path))
    with pytest.raises(Crash):
        server_app.run(grid, RunConfig.from_flower(rc(tmp_path)))
    other = rc(tmp_path, resume=True, **{"ta-lambda": 0.5})
    with pytest.raises(checkpoint.CheckpointError, match=r"ta-lambda: 1\.0 in the checkpoint, 0\.5"):
        server_app.run(InProcessGrid(2, other), RunConfig.from_flower(other))
    with pytest.raises(checkpoint.CheckpointError, match="clients: 2 in the checkpoint, 3"):
        same = rc(tmp_path, resume=True)
        server_app.run(InProcessGrid(3, same), RunConfig.from_flower(same))
    # and a fresh run under the same name does not overwrite it
    with pytest.raises(checkpoint.CheckpointError, match="resume=true continues it"):
        server_app.run(InProcessGrid(2, rc(tmp_path)), RunConfig.from_flower(rc(tmp_path)))


def test_resume_needs_a_run_name():
    with pytest.raises(ValueError, match="run-name"):
        RunConfig.from_flower({"resume": True})
    assert RunConfig.from_flower({"resume": "true", "run-name": "x"}).resume is True
    with pytest.raises(ValueError, match="true or false"):
        RunConfig.from_flower({"resume": "yes", "run-name": "x"})


def test_a_reply_after_its_rounds_timeout_is_discarded_not_merged_later(tiny, tmp_path):
    """Node 101's round-1 train reply becomes ready only after the round's timeout: round 1
    goes on without it, and round 2 merges round 2's replies only."""
    late_by = 2.0

    class SlowGrid(InProcessGrid):
        late_id, ready_at, handled = None, None, []

        def push_messages(self, messages):
            ids = super().push_messages(messages)
            for mid, m in zip(ids, messages):
                if (m.metadata.message_type == MessageType.TRAIN and self.late_id is None
                        and m.metadata.dst_node_id == 101):
                    SlowGrid.late_id, SlowGrid.ready_at = mid, time.monotonic() + late_by
            return ids

        def pull_messages(self, message_ids):
            for mid in message_ids:
                if mid == self.late_id and time.monotonic() < self.ready_at:
                    continue  # not there yet
                SlowGrid.handled.append(mid)
                yield from super().pull_messages([mid])

    cfg = rc(tmp_path, strategy="collabedit", **{"num-server-rounds": 2, "round-timeout": 0.5})
    grid = SlowGrid(2, cfg)
    summary = server_app.run(grid, RunConfig.from_flower(cfg))
    rounds = summary["strategies"]["collabedit"]["rounds"]
    assert [f["reason"] for f in rounds[0]["failed"]] == ["no train reply"]
    assert rounds[0]["failed"][0]["client"] == "client 1"  # named by its answer to the query
    time.sleep(late_by)
    assert SlowGrid.late_id not in SlowGrid.handled  # never pulled, so never merged
    assert [m["num-edits"] for m in rounds[1]["client_metrics"]["client 0"]] == [1]
    assert not rounds[1]["failed"] and len(rounds[1]["client_metrics"]) == 2


def test_an_unreachable_node_is_named_by_where_its_message_went(tiny, tmp_path):
    """The SuperLink answers for a node that stopped sending heartbeats, from its own node id:
    the failure is still recorded under the party the message was for."""
    from flwr.app import Error, Message

    class OfflineGrid(InProcessGrid):
        def pull_messages(self, message_ids):
            for mid in message_ids:
                msg = self._queue.get(mid)
                if (msg is not None and msg.metadata.dst_node_id == 101
                        and msg.metadata.message_type == MessageType.TRAIN):
                    del self._queue[mid]
                    reply = Message(Error(code=0, reason="Node Unavailable"), reply_to=msg)
                    reply.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's
                    yield reply
                    continue
                yield from super().pull_messages([mid])

    cfg = rc(tmp_path, strategy="collabedit", **{"num-server-rounds": 1})
    summary = server_app.run(OfflineGrid(2, cfg), RunConfig.from_flower(cfg))
    failed = summary["strategies"]["collabedit"]["rounds"][0]["failed"]
    assert failed == [{"client": "client 1", "reason": "client 1 failed: Node Unavailable"}]
