"""Meta-train MALMEN's hypernetwork on zsRE's train split, and cache it.

    python -m editing.train_malmen --model smollm2 --max-minutes 30

Edit / equivalence / locality tuples come from the 1,000 train-split zsRE records
(`zsre/mem_eval_format/zsre_mend_train-1k.json` in the data directory; none of them is an evaluation
record); a fixed, seeded share of them is held out for validation (EA / PA / NA and the meta-loss
every `val_every` steps, early stopping on the validation meta-loss, the best network kept).
Progress is checkpointed at every validation, so an interrupted run resumes where it stopped. The
trained network goes to the user cache (`editing.models.cache_dir()/malmen`), keyed by the model
fingerprint, the layers, every hyper-parameter and the training records: never into the repository.

Before it starts, the command times one meta-training step and prints how long the run will take;
`--max-minutes` bounds it (the best network so far is kept when the bound is reached).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import DataError, EditRequest, load_requests, resolve_dataset
from .evaluate import EvalResult, evaluate
from .malmen import (MalmenHparams, MalmenNet, MalmenWorkspace, edit, keys_and_grads, load_net, malmen_preset,
                     meta_batch, meta_loss, meta_step_grads, net_dir, net_key, new_net,
                     records_digest, save_net, training_pairs)
from .models import LoadedModel, describe, load_model
from .update import applied

log = logging.getLogger(__name__)
TRAIN_FILE = "zsre_mend_train-1k.json"


def training_records(path: str | Path | None = None) -> list[EditRequest]:
    """zsRE train-split records as requests; a record unusable for meta-training (no rephrase, no
    locality question, a subject missing from its question, ...) raises `DataError` naming it."""
    file = Path(path) if path else resolve_dataset("zsre").with_name(TRAIN_FILE)
    if not file.is_file():
        raise DataError(f"{file}: no such file (the zsRE train split lies beside the eval file)")
    requests = load_requests("zsre", file)  # validates every record, raising with its index
    for index, request in enumerate(requests):
        try:
            training_pairs(request)
        except ValueError as e:
            raise DataError(f"{file}, record {index} (case_id {request.case_id}): {e}") from None
    return requests


def split_records(records: list[EditRequest], val_size: int, seed: int):
    """(train, validation): a seeded permutation, the last `val_size` held out."""
    if not 0 < val_size < len(records):
        raise ValueError(f"val_size must be in (0, {len(records)}), got {val_size}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[-val_size:])
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def step_batch(train: list[EditRequest], hp: MalmenHparams, step: int) -> list[EditRequest]:
    """The requests of meta-training step `step`: epochs of seeded permutations, so the order is a
    function of (seed, step) alone and a resumed run sees the same batches."""
    per_epoch = len(train) // hp.edits_per_step
    epoch, at = divmod(step, per_epoch)
    order = list(range(len(train)))
    random.Random(f"{hp.seed}:{epoch}").shuffle(order)
    return [train[i] for i in order[at * hp.edits_per_step:(at + 1) * hp.edits_per_step]]


def chunked(xs, size):
    return [xs[i:i + size] for i in range(0, len(xs), size)]


class Validator:
    """EA / PA / NA and the meta-loss of the current network on the held-out records, edited
    `edits_per_step` at a time (the training condition)."""

    def __init__(self, lm: LoadedModel, val: list[EditRequest], hp: MalmenHparams):
        self.lm, self.hp = lm, hp
        self.chunks = chunked(val, hp.edits_per_step)
        self.batches = [meta_batch(lm, c) for c in self.chunks]  # unedited references, once

    def __call__(self, net: MalmenNet) -> dict:
        frozen = bool(net.normalizer.frozen)
        net.normalizer.frozen.fill_(True)  # validation reads the statistics, never adds to them
        result, losses = EvalResult(), []
        try:
            for chunk, mb in zip(self.chunks, self.batches):
                edited = edit(self.lm, chunk, net, batch_size=self.hp.batch_size)
                with applied(self.lm, edited.deltas), torch.no_grad():
                    result = result.merge(evaluate(self.lm.model, self.lm.tok, chunk))
                    losses.append(meta_loss(self.lm, mb, self.hp.loc_coef)[1])
        finally:
            net.normalizer.frozen.fill_(frozen)
        s = result.summary("zsre")
        mean = lambda k: sum(x[k] for x in losses) / len(losses)  # noqa: E731
        return {"ea": s["ea"], "pa": s["pa"], "na": s["na"], "score": s["score"],
                "meta": mean("meta"), "gen": mean("gen"), "loc": mean("loc")}


def meta_train_step(lm: LoadedModel, net: MalmenNet, opt, batch: list[EditRequest],
                    hp: MalmenHparams, *, update: bool = True) -> dict:
    """Keys and value gradients of the edit prompts (the normaliser learns their statistics), the
    two-stage backward of the meta-loss, one clipped Adam step."""
    keys, grads = keys_and_grads(lm, batch, net.layers, batch_size=hp.batch_size)
    if update:
        for l in net.layers:
            net.normalizer.update(torch.cat((keys[l], grads[l]), -1))
    opt.zero_grad(set_to_none=True)
    parts = meta_step_grads(lm, net, meta_batch(lm, batch), keys, grads, hp.loc_coef)
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), hp.max_grad_norm)
    if update:
        opt.step()
    else:
        opt.zero_grad(set_to_none=True)
    return {**parts, "grad_norm": float(norm)}


def train(lm: LoadedModel, hp: MalmenHparams, records: list[EditRequest], *,
          checkpoint: Path | None = None, max_minutes: float = math.inf, progress: bool = True,
          estimate: bool = True) -> tuple[MalmenNet, dict]:
    """Meta-train a network for `lm`; returns the best network (normaliser frozen) and the run's
    record (validation curve, timings, why it stopped)."""
    train_set, val_set = split_records(records, hp.val_size, hp.seed)
    if len(train_set) < hp.edits_per_step:
        raise ValueError(f"{len(train_set)} training records; a step edits {hp.edits_per_step}")
    net = new_net(lm, hp)
    opt = torch.optim.Adam(net.parameters(), lr=hp.meta_lr)
    state = {"step": 0, "history": [], "best": None, "best_state": None, "bad": 0,
             "seconds": 0.0, "stopped": ""}
    if checkpoint and checkpoint.exists():
        blob = torch.load(checkpoint, map_location="cpu", weights_only=False)
        net.load_state_dict(blob["net"])
        opt.load_state_dict(blob["opt"])
        state = blob["state"]
        log.info("resuming %s at step %d", checkpoint, state["step"])
    validate = Validator(lm, val_set, hp)
    if state["step"] == 0:
        # the normaliser's statistics from a few batches first: at step 0 it would otherwise
        # divide by a zero standard deviation (the reference never validates before training)
        for s in range(hp.norm_warmup):
            keys, grads = keys_and_grads(lm, step_batch(train_set, hp, s), net.layers,
                                         batch_size=hp.batch_size)
            for l in net.layers:
                net.normalizer.update(torch.cat((keys[l], grads[l]), -1))
        t_val = time.perf_counter()
        first = validate(net)
        per_val = time.perf_counter() - t_val
        state["history"].append({"step": 0, **first})
        state["best"], state["best_state"] = first["meta"], _copy(net.state_dict())
    else:
        per_val = None
    if estimate and state["step"] < hp.steps:
        # one step's cost, measured without updating anything
        t_probe = time.perf_counter()
        meta_train_step(lm, net, opt, step_batch(train_set, hp, state["step"]), hp, update=False)
        per_step = time.perf_counter() - t_probe
        if per_val is None:
            t_val = time.perf_counter()
            validate(net)
            per_val = time.perf_counter() - t_val
        left = hp.steps - state["step"]
        total = left * per_step + (left // hp.val_every + 1) * per_val
        bound = f"; bounded by --max-minutes {max_minutes:g}" if math.isfinite(max_minutes) else ""
        print(f"MALMEN meta-training: {left} steps x {per_step:.1f} s + {left // hp.val_every + 1} "
              f"validations x {per_val:.1f} s = about {total / 60:.1f} min on "
              f"{torch.get_num_threads()} thread(s){bound}", flush=True)
    start = time.perf_counter() - state["seconds"]
    bar = tqdm(range(state["step"], hp.steps), desc="malmen meta-train", unit="step",
               disable=not progress, initial=state["step"], total=hp.steps)
    for step in bar:
        parts = meta_train_step(lm, net, opt, step_batch(train_set, hp, step), hp)
        bar.set_postfix(meta=f"{parts['meta']:.3f}", gen=f"{parts['gen']:.3f}", loc=f"{parts['loc']:.4f}")
        state["step"] = step + 1
        last = step + 1 == hp.steps
        over = (time.perf_counter() - start) / 60 > max_minutes
        if (step + 1) % hp.val_every == 0 or last or over:
            v = validate(net)
            state["history"].append({"step": step + 1, "train_meta": parts["meta"], **v})
            tqdm.write(f"step {step + 1}: val EA {v['ea']:.1f} PA {v['pa']:.1f} NA {v['na']:.1f} "
                       f"meta {v['meta']:.4f} (gen {v['gen']:.4f}, loc {v['loc']:.4f})")
            if state["best"] is None or v["meta"] < state["best"]:
                state["best"], state["best_state"], state["bad"] = v["meta"], _copy(net.state_dict()), 0
            else:
                state["bad"] += 1
            state["seconds"] = time.perf_counter() - start
            if checkpoint:
                _save_checkpoint(checkpoint, net, opt, state)
            if state["bad"] >= hp.patience:
                state["stopped"] = f"early stop: no better validation meta-loss in {hp.patience} checks"
                break
            if over:
                state["stopped"] = f"time bound: {max_minutes:g} min reached"
                break
    bar.close()
    state["stopped"] = state["stopped"] or "all steps done"
    state["seconds"] = time.perf_counter() - start
    if state["best_state"] is not None:
        net.load_state_dict(state["best_state"])
    net.normalizer.frozen.fill_(True)
    record = {k: state[k] for k in ("step", "history", "best", "seconds", "stopped")}
    return net, record


def _copy(sd: dict) -> dict:
    return {k: v.detach().clone() for k, v in sd.items()}


def _save_checkpoint(path: Path, net, opt, state) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "state": state}, tmp)
    tmp.replace(path)


def trained_path(lm: LoadedModel, hp: MalmenHparams, records: list[EditRequest]) -> Path:
    return net_dir() / f"{net_key(lm, hp, records_digest(records))}.pt"


def get_trained(lm: LoadedModel, hp: MalmenHparams | None = None, records=None, *,
                train_if_missing: bool = False, max_minutes: float = math.inf,
                progress: bool = True) -> tuple[MalmenNet, dict]:
    """The cached network for (model, hp, records); trained first if asked, else an error naming
    the command that trains it."""
    hp = hp or malmen_preset(lm)
    records = records if records is not None else training_records()
    path = trained_path(lm, hp, records)
    if path.exists():
        net, _, meta = load_net(path, lm.device)
        return net, meta
    if not train_if_missing:
        raise FileNotFoundError(
            f"no trained MALMEN network for {lm.name} layers {list(hp.layers)} rank {hp.rank} in "
            f"{path.parent}; train it first: python -m editing.train_malmen --model {lm.name} "
            f"--layers {','.join(map(str, hp.layers))} --rank {hp.rank} --steps {hp.steps}")
    net, record = train(lm, hp, records, checkpoint=path.with_suffix(".ckpt"),
                        max_minutes=max_minutes, progress=progress)
    meta = {"model": describe(lm), "hparams": hp.to_dict(), "records": len(records), **record}
    save_net(net, hp, path, meta)
    path.with_suffix(".ckpt").unlink(missing_ok=True)
    return net.to(lm.device), meta


_OPEN: dict[tuple, MalmenWorkspace] = {}


def open_malmen_workspace(model: str = "smollm2", *, dtype: str = "float32", device: str = "",
                          layers=None, train_if_missing: bool = False) -> MalmenWorkspace:
    """The model and its trained MALMEN network, opened once per process (as
    editing.workspace.open_workspace for MEMIT). A network not in the cache raises, naming the
    command that trains it, unless `train_if_missing`."""
    key = (model, dtype, device, str(layers))
    if key not in _OPEN:
        lm = load_model(model, device=device or None, dtype=dtype)
        hp = malmen_preset(lm).with_overrides(layers=layers or None)
        net, _ = get_trained(lm, hp, train_if_missing=train_if_missing)
        net = net.to(lm.device).requires_grad_(False)  # editing never trains it
        _OPEN[key] = MalmenWorkspace(lm=lm, hp=hp, net=net)
    return _OPEN[key]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="")
    ap.add_argument("--train-path", default=None, help="zsRE train-split file (default: the data dir's)")
    ap.add_argument("--layers", default=None)
    for name in ("rank", "n_blocks", "edits_per_step", "steps", "val_every", "val_size",
                 "patience", "seed"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    for name in ("lr", "meta_lr", "loc_coef", "max_grad_norm"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    ap.add_argument("--max-minutes", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--out", type=Path, default=None, help="write the training record here as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device=args.device or None, dtype=args.dtype)
    overrides = {k: getattr(args, k) for k in ("layers", "rank", "n_blocks", "edits_per_step",
                                               "steps", "val_every", "val_size", "patience", "seed",
                                               "lr", "meta_lr", "loc_coef", "max_grad_norm")}
    hp = malmen_preset(lm).with_overrides(**overrides)
    records = training_records(args.train_path)
    t0 = time.perf_counter()
    _, meta = get_trained(lm, hp, records, train_if_missing=True, max_minutes=args.max_minutes)
    meta = {**meta, "cache": str(trained_path(lm, hp, records)), "wall_seconds": time.perf_counter() - t0,
            "threads": torch.get_num_threads()}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(meta, indent=1, default=str))
    print(json.dumps({k: meta[k] for k in ("stopped", "seconds", "cache")}, indent=1))
    for h in meta.get("history", []):
        print(f"  step {h['step']:>4}: EA {h['ea']:.1f} PA {h['pa']:.1f} NA {h['na']:.1f} "
              f"meta {h['meta']:.4f}")
    return meta


if __name__ == "__main__":
    main()
