"""Batched z optimisation vs the reference's per-request loop, on the same requests.

    python benchmarks/bench_z.py --model smollm2 --dataset counterfact --n 16

Prints requests/second of both, their ratio (measured in this one run), and the largest difference
between the two sets of z vectors.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from editing.data import load_requests
from editing.memit import compute_z, compute_z_reference, context_templates
from editing.models import load_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dataset", default="counterfact")
    ap.add_argument("--dataset-path", default=None)
    ap.add_argument("--n", type=int, default=16, help="requests")
    ap.add_argument("--z-batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    hp = lm.spec.hparams.with_overrides(z_batch_size=args.z_batch_size)
    requests = load_requests(args.dataset, args.dataset_path, limit=args.n)
    templates = context_templates(lm, hp.context_templates, hp.context_template_tokens)

    t0 = time.perf_counter()
    batched = compute_z(lm, requests, hp, templates, progress=True)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = torch.cat([compute_z_reference(lm, r, hp, templates).z for r in requests])
    t_reference = time.perf_counter() - t0

    diff = (batched.z - reference).abs().max().item()
    rel = diff / reference.abs().max().item()
    report = {
        "model": lm.name, "dataset": args.dataset, "requests": len(requests),
        "z_batch_size": hp.z_batch_size, "threads": args.threads,
        "batched_requests_per_s": len(requests) / t_batched,
        "reference_requests_per_s": len(requests) / t_reference,
        "speedup": t_reference / t_batched,
        "max_abs_z_diff": diff, "max_rel_z_diff": rel,
        "mean_p_target": batched.p_target.mean().item(),
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
