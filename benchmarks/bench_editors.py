"""Edits per second of MALMEN against MEMIT on the same zsRE requests, one model, one run.

    python benchmarks/bench_editors.py --n 32 --threads 1

Both editors edit the same N zsRE evaluation records at once on the same loaded SmolLM2, one after
the other; the timed part is the edit itself (MEMIT: z optimisation + keys + solves, no z cache;
MALMEN: the keys / gradients pass + hypernetwork + solves). One-time costs are reported apart and
not timed in: MEMIT's covariance statistics (`--cov-samples` Wikipedia texts) and MALMEN's
meta-training (the network comes from the cache, `python -m editing.train_malmen`). Both edits are
also scored (EA / PA / NA) so the speed is not bought with quality unseen.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from editing import malmen, memit
from editing.data import dataset_options, load_requests
from editing.evaluate import evaluate
from editing.models import describe, load_model
from editing.train_malmen import get_trained
from editing.update import applied
from editing.workspace import workspace_for


def scored(lm, requests, deltas) -> dict:
    with applied(lm, deltas):
        return evaluate(lm.model, lm.tok, requests).summary("zsre")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--cov-samples", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    requests = load_requests("zsre", limit=args.n, offset=args.offset, **dataset_options("zsre"))
    report = {"model": describe(lm), "requests": len(requests), "offset": args.offset,
              "threads": torch.get_num_threads(), "platform": platform.platform(),
              "torch": torch.__version__}
    report["unedited"] = evaluate(lm.model, lm.tok, requests).summary("zsre")

    t0 = time.perf_counter()
    ws = workspace_for(lm, cov_samples=args.cov_samples)
    stats = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = memit.edit(lm, requests, ws.hp, ws.covariance(), mode="parallel",
                        templates=ws.templates, progress=True)
    seconds = time.perf_counter() - t0
    report["memit"] = {"seconds": seconds, "edits_per_s": len(requests) / seconds,
                       "parts": result.seconds, "layers": list(ws.hp.layers), "mode": "parallel",
                       "statistics_seconds_not_timed": stats, "cov_samples": args.cov_samples,
                       "post": scored(lm, requests, result.deltas)}
    print("MEMIT", json.dumps(report["memit"]), flush=True)
    hp = malmen.malmen_preset(lm)
    net, _ = get_trained(lm, hp)
    t0 = time.perf_counter()
    result = malmen.edit(lm, requests, net)
    seconds = time.perf_counter() - t0
    report["malmen"] = {"seconds": seconds, "edits_per_s": len(requests) / seconds,
                        "parts": result.seconds, "layers": list(hp.layers),
                        "post": scored(lm, requests, result.deltas)}
    print("MALMEN", json.dumps(report["malmen"]), flush=True)

    report["speedup"] = report["malmen"]["edits_per_s"] / report["memit"]["edits_per_s"]
    print(f"MALMEN {report['malmen']['edits_per_s']:.3f} edits/s, MEMIT "
          f"{report['memit']['edits_per_s']:.3f} edits/s: {report['speedup']:.1f}x", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
