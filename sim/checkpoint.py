"""Server checkpoints: what a multi-round run needs to go on after its ServerApp dies.

After every round the server writes one file, `<results-dir>/<run-name>/checkpoint.safetensors`,
atomically (a temporary file, flushed, then renamed over the old one): a crash while writing
leaves the previous round's checkpoint whole. It holds

- the strategy in progress: its last finished round, its history, the global deltas after that
  round and the dynamic covariance's past `K K^T` (as summed: factored or square);
- every strategy already finished: its summary entry and its final deltas;
- the run config (minus the keys that do not change what is computed) and the number of
  clients, so that a checkpoint of another run is refused with the difference named.

Arrays are float64 as the server holds them, so a resumed run continues from bit-identical
state; the rest is JSON in the file's metadata. Nothing a client sent is in it beyond what the
server keeps anyway (the sums).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

FILE = "checkpoint.safetensors"
# keys that say where and how patiently a run goes, not what it computes
NOT_COMPARED = ("resume", "run-name", "results-dir", "round-timeout")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed by this run."""


@dataclass
class Progress:
    """The strategy in progress, after its last finished round."""

    strategy: str
    round: int
    seconds: float
    history: list[dict]
    global_deltas: dict[int, np.ndarray]
    past_kkt: dict[int, dict[str, np.ndarray]]


@dataclass
class State:
    config: dict
    num_clients: int
    done: dict[str, dict] = field(default_factory=dict)  # strategy -> its summary entry
    finals: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    current: Progress | None = None


def compared(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NOT_COMPARED}


def save(path: Path, state: State) -> None:
    tensors: dict[str, np.ndarray] = {}
    for name, deltas in state.finals.items():
        for layer, d in deltas.items():
            tensors[f"final/{name}/{layer}"] = np.ascontiguousarray(d)
    meta = {"config": compared(state.config), "num_clients": state.num_clients,
            "done": state.done, "current": None}
    if state.current is not None:
        c = state.current
        for layer, d in c.global_deltas.items():
            tensors[f"global/{layer}"] = np.ascontiguousarray(d)
        for layer, fields in c.past_kkt.items():
            for f, v in fields.items():
                tensors[f"past-kkt/{layer}/{f}"] = np.ascontiguousarray(v)
        meta["current"] = {"strategy": c.strategy, "round": c.round, "seconds": c.seconds,
                           "history": c.history}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"state": json.dumps(meta, default=str)})
    with open(tmp, "rb+") as fh:  # on disk before it replaces the last good one
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(path: Path, config: dict, num_clients: int | None) -> State:
    """The checkpoint at `path`, refused unless it was written by this run config and (unless
    `num_clients` is None: parties with their own files, who may come and go) client count."""
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = json.loads(fh.metadata()["state"])
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from err
    ours, theirs = compared(config), meta["config"]
    diff = [f"{k}: {theirs.get(k, '<absent>')!r} in the checkpoint, {ours.get(k, '<absent>')!r} "
            f"in this run" for k in sorted(ours.keys() | theirs.keys()) if ours.get(k) != theirs.get(k)]
    if num_clients is not None and meta["num_clients"] != num_clients:
        diff.append(f"clients: {meta['num_clients']} in the checkpoint, {num_clients} in this run")
    if diff:
        raise CheckpointError(f"checkpoint {path} belongs to another run; " + "; ".join(diff))
    state = State(config=config, num_clients=meta["num_clients"] if num_clients is None
                  else num_clients, done=meta["done"])
    for key, value in arrays.items():
        kind, *rest = key.split("/")
        if kind == "final":
            state.finals.setdefault(rest[0], {})[int(rest[1])] = value
    if (c := meta["current"]) is not None:
        state.current = Progress(
            strategy=c["strategy"], round=int(c["round"]), seconds=float(c["seconds"]),
            history=c["history"],
            global_deltas={int(k.split("/")[1]): v for k, v in arrays.items()
                           if k.startswith("global/")},
            past_kkt={})
        for key, value in arrays.items():
            if key.startswith("past-kkt/"):
                _, layer, f = key.split("/")
                state.current.past_kkt.setdefault(int(layer), {})[f] = value
    return state
