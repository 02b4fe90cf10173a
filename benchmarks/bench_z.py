"""MEMIT's z optimisation: the fast path (`editing.memit.compute_z`) against the independent
one-request-at-a-time reference (`editing.reference_memit.reference_z`), on the same requests in
one run.

    python benchmarks/bench_z.py --n 16 --threads 2 --out results/editing/bench-z-smollm2-n16.json

Prints requests/s of both and their ratio, the largest z difference, mean p(target) and steps of
both, peak RSS, and a profile of where each one's time goes (attention, MLP, head, backward,
optimiser, the rest), per optimiser step and per request-step (one request's loss evaluated
once). The profile hooks are attached from here, so neither implementation knows about them.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                    register_optimizer_step_pre_hook)

from editing.data import load_requests
from editing.memit import compute_z, context_templates
from editing.models import load_model, module
from editing.reference_memit import reference_z


@contextmanager
def profiled(lm):
    """Seconds spent in each part of the model and the loop while the block runs."""
    spent = defaultdict(float)
    counts = defaultdict(int)
    handles = []

    def timer(kind, mod):
        def pre(*_):
            mod._bench_t0 = time.perf_counter()

        def post(*_):
            spent[kind] += time.perf_counter() - mod._bench_t0
        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))

    model, spec = lm.model, lm.spec
    for i in range(model.config.num_hidden_layers):
        block = module(model, spec.block.format(i))
        for name, sub in block.named_children():
            if "attn" in name or "attention" in name:
                timer("attention", sub)
            elif name == "mlp":
                timer("mlp", sub)
    timer("head", module(model, spec.final_norm))
    timer("head", model.get_output_embeddings())

    def opt_pre(opt, *_):
        opt._bench_t0 = time.perf_counter()

    def opt_post(opt, *_):
        spent["optimiser"] += time.perf_counter() - opt._bench_t0
        counts["steps"] += 1
    handles.append(register_optimizer_step_pre_hook(opt_pre))
    handles.append(register_optimizer_step_post_hook(opt_post))

    backward = torch.Tensor.backward

    def timed_backward(self, *a, **k):
        t0 = time.perf_counter()
        backward(self, *a, **k)
        spent["backward"] += time.perf_counter() - t0
    torch.Tensor.backward = timed_backward
    t0 = time.perf_counter()
    try:
        yield spent, counts
    finally:
        spent["total"] = time.perf_counter() - t0
        torch.Tensor.backward = backward
        for h in handles:
            h.remove()


def profile_table(spent, counts, request_steps: int) -> dict:
    parts = ("attention", "mlp", "head", "backward", "optimiser")
    rest = spent["total"] - sum(spent[p] for p in parts)
    out = {"optimiser_steps": counts["steps"], "request_steps": request_steps,
           "total_s": spent["total"]}
    for p in (*parts, "rest"):
        s = rest if p == "rest" else spent[p]
        out[p] = {"s": s, "per_step_s": s / max(counts["steps"], 1),
                  "per_request_step_ms": 1000 * s / max(request_steps, 1),
                  "share": s / spent["total"]}
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dataset", default="counterfact")
    ap.add_argument("--dataset-path", default=None)
    ap.add_argument("--n", type=int, default=16, help="requests")
    ap.add_argument("--z-batch-size", type=int, default=0, help="0: the model preset's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference-n", type=int, default=0,
                    help="run the reference on only the first N requests (0: all); its rate is "
                         "per request, so the ratio stays a like-for-like figure")
    ap.add_argument("--out", default=None, help="write the report here as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    hp = lm.spec.hparams.with_overrides(z_batch_size=args.z_batch_size or None)
    requests = load_requests(args.dataset, args.dataset_path, limit=args.n)
    templates = context_templates(lm, hp.context_templates, hp.context_template_tokens)

    with profiled(lm) as (spent, counts):
        fast = compute_z(lm, requests, hp, templates, progress=True)
    fast_s = spent["total"]
    fast_profile = profile_table(spent, counts, int((fast.steps + 1).sum()))

    ref_requests = requests[: args.reference_n or len(requests)]
    refs = []
    with profiled(lm) as (spent, counts):
        for r in ref_requests:
            refs.append(reference_z(lm, r, hp, templates))
    ref_s = spent["total"]
    ref_steps = torch.tensor([r["steps"] for r in refs])
    ref_profile = profile_table(spent, counts, int((ref_steps + 1).sum()))

    m = len(ref_requests)
    ref_z = torch.stack([r["z"] for r in refs]).to(fast.z.device, fast.z.dtype)
    rel = ((fast.z[:m] - ref_z).norm(dim=-1) / ref_z.norm(dim=-1)).max().item()
    ref_p = torch.stack([r["p_target"] for r in refs]).double()
    report = {
        "model": lm.name, "dataset": args.dataset, "requests": len(requests),
        "reference_requests": m, "z_batch_size": hp.z_batch_size, "threads": args.threads,
        "layers": list(hp.layers), "v_num_grad_steps": hp.v_num_grad_steps,
        "fast_requests_per_s": len(requests) / fast_s,
        "reference_requests_per_s": m / ref_s,
        "speedup": (len(requests) / fast_s) / (m / ref_s),
        "fast_s_per_request": fast_s / len(requests),
        "reference_s_per_request": ref_s / m,
        "max_abs_z_diff": (fast.z[:m] - ref_z).abs().max().item(),
        "max_rel_z_diff": rel,
        "mean_p_target_fast": fast.p_target[:m].double().mean().item(),
        "mean_p_target_reference": ref_p.mean().item(),
        "max_p_target_diff": (fast.p_target[:m].double() - ref_p).abs().max().item(),
        "mean_steps_fast": fast.steps[:m].double().mean().item(),
        "mean_steps_reference": ref_steps.double().mean().item(),
        "steps_equal": bool((fast.steps[:m] == ref_steps).all()),
        "profile_fast": fast_profile,
        "profile_reference": ref_profile,
        "peak_rss_mb": peak_rss_mb(),
        "torch": torch.__version__, "device": str(lm.device),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
