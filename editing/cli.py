"""Centralised editing (GLOBAL-EDIT on its own): edit N requests of a dataset, write pre/post
metrics and timings as JSON.

    python -m editing.cli --model smollm2 --dataset counterfact --n 100 --out edit.json
    python -m editing.cli --editor malmen --dataset zsre --n 100   # after editing.train_malmen
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from .data import dataset_options, load_requests
from .evaluate import evaluate, evaluate_cached
from . import malmen
from .memit import edit
from .train_malmen import open_malmen_workspace
from .update import applied
from .models import cache_dir, describe, load_model
from .workspace import workspace_for


def run_edit(*, model="smollm2", dataset="counterfact", dataset_path=None, n=32, offset=0,
             mode="sequential", layers=None, mom2_update_weight=0.0, v_num_grad_steps=0,
             cov_samples=1000, dtype="float32", device="", batch_size=32, seed=0,
             editor="memit", hparams_file=None) -> dict:
    if editor == "malmen":
        if hparams_file:
            raise ValueError("--hparams-file holds MEMIT settings; MALMEN's come with its network")
        return run_malmen_edit(model=model, dataset=dataset, dataset_path=dataset_path, n=n,
                               offset=offset, layers=layers, dtype=dtype, device=device,
                               batch_size=batch_size, seed=seed)
    if editor != "memit":
        raise ValueError(f"editor must be 'memit' or 'malmen', got {editor!r}")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    lm = load_model(model, device=device or None, dtype=dtype, hparams_file=hparams_file)
    t_model = time.perf_counter()
    ws = workspace_for(lm, layers=layers, mom2_update_weight=mom2_update_weight,
                       v_num_grad_steps=v_num_grad_steps, cov_samples=cov_samples)
    t_stats = time.perf_counter()
    requests = load_requests(dataset, dataset_path, limit=n, offset=offset,
                             **dataset_options(dataset))
    t1 = time.perf_counter()
    pre = evaluate_cached(ws.lm.model, ws.lm.tok, requests, cache_dir() / "pre_edit",
                          ws.lm.fingerprint, batch_size=batch_size, progress=True)
    t2 = time.perf_counter()
    result = edit(ws.lm, requests, ws.hp, ws.covariance(), mode=mode, templates=ws.templates,
                  progress=True, z_cache=cache_dir() / "z")
    t3 = time.perf_counter()
    with applied(ws.lm, result.deltas):
        post = evaluate(ws.lm.model, ws.lm.tok, requests, batch_size=batch_size, progress=True)
    t4 = time.perf_counter()
    return {
        "model": describe(ws.lm), "dataset": dataset, "dataset_path": dataset_path,
        "requests": len(requests), "offset": offset, "mode": mode, "seed": seed,
        "hparams": vars(ws.hp), "cov_samples": cov_samples,
        "pre": pre.summary(), "post": post.summary(),
        "z_p_target_mean": float(result.z.p_target.mean()),
        "residual_norm_mean": {l: float(e.residual_norms.mean()) for l, e in result.layers.items()},
        "seconds": {"load": t1 - t0, "model": t_model - t0, "statistics": t_stats - t_model,
                    "pre_eval": t2 - t1, "edit": t3 - t2, **result.seconds,
                    "post_eval": t4 - t3, "edit_per_request": (t3 - t2) / len(requests),
                    "z_per_request": result.seconds["z"] / len(requests), "total": t4 - t0},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "platform": platform.platform()},
    }


def run_malmen_edit(*, model, dataset, dataset_path, n, offset, layers, dtype, device, batch_size,
                    seed) -> dict:
    """The same report with MALMEN: the trained network from the user cache (train it first with
    `python -m editing.train_malmen`), no z and no covariance statistics."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    ws = open_malmen_workspace(model, dtype=dtype, device=device, layers=layers)
    requests = load_requests(dataset, dataset_path, limit=n, offset=offset,
                             **dataset_options(dataset))
    t1 = time.perf_counter()
    pre = evaluate_cached(ws.lm.model, ws.lm.tok, requests, cache_dir() / "pre_edit",
                          ws.lm.fingerprint, batch_size=batch_size, progress=True)
    t2 = time.perf_counter()
    result = malmen.edit(ws.lm, requests, ws.net, progress=True)
    t3 = time.perf_counter()
    with applied(ws.lm, result.deltas):
        post = evaluate(ws.lm.model, ws.lm.tok, requests, batch_size=batch_size, progress=True)
    t4 = time.perf_counter()
    return {
        "model": describe(ws.lm), "editor": "malmen", "dataset": dataset,
        "dataset_path": dataset_path, "requests": len(requests), "offset": offset, "seed": seed,
        "hparams": ws.hp.to_dict(),
        "lam": {l: float(ws.net.lam[ws.net.index(l)].detach()) for l in ws.net.layers},
        "pre": pre.summary(), "post": post.summary(),
        "keys_per_layer": len(next(iter(result.layers.values())).residual_norms),
        "seconds": {"load": t1 - t0, "pre_eval": t2 - t1, "edit": t3 - t2, **result.seconds,
                    "post_eval": t4 - t3, "edit_per_request": (t3 - t2) / len(requests)},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "platform": platform.platform()},
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dataset", default="counterfact")
    ap.add_argument("--dataset-path", default=None)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--editor", choices=["memit", "malmen"], default="memit",
                    help="malmen: the network trained by python -m editing.train_malmen")
    ap.add_argument("--mode", choices=["sequential", "parallel"], default="sequential",
                    help="MEMIT only")
    ap.add_argument("--hparams-file", default=None,
                    help="a preset file (python -m editing.tune) in place of the model preset")
    ap.add_argument("--layers", default=None, help='e.g. "4-8"; default: the model preset')
    ap.add_argument("--mom2-update-weight", type=float, default=0.0)
    ap.add_argument("--v-num-grad-steps", type=int, default=0)
    ap.add_argument("--cov-samples", type=int, default=1000)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the report here as JSON")
    args = vars(ap.parse_args(argv))
    out = args.pop("out")
    report = run_edit(**args)
    text = json.dumps(report, indent=1, default=str)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(json.dumps({"pre": report["pre"], "post": report["post"],
                      "seconds": report["seconds"]}, indent=1))
    return report


if __name__ == "__main__":
    main()
