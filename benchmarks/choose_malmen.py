"""The measurement behind SmolLM2's MALMEN layers, rank and initial step scale (editing/HPARAMS.md).

Short meta-training runs of `editing.train_malmen.train` on the zsRE train split, one per setting,
each validated on the same held-out train-split records; one JSON line per setting:

    python benchmarks/choose_malmen.py --layer-sets 24-29,4-8 --ranks 256 --lrs 1e-3 --steps 40
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from editing.malmen import malmen_preset
from editing.models import load_model
from editing.train_malmen import train, training_records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layer-sets", default="24-29,4-8")
    ap.add_argument("--ranks", default="256")
    ap.add_argument("--lrs", default="1e-3")
    ap.add_argument("--meta-lr", type=float, default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--val-every", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("results/hparams/malmen-smollm2.jsonl"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    records = training_records()
    base = malmen_preset(lm)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid = itertools.product(args.layer_sets.split(";") if ";" in args.layer_sets else args.layer_sets.split(","),
                             [int(r) for r in args.ranks.split(",")],
                             [float(x) for x in args.lrs.split(",")])
    for layers, rank, lr in grid:
        hp = base.with_overrides(layers=layers, rank=rank, lr=lr, meta_lr=args.meta_lr,
                                 steps=args.steps, val_every=args.val_every, patience=10**6)
        t0 = time.perf_counter()
        _, record = train(lm, hp, records, estimate=True)
        row = {"layers": layers, "rank": rank, "lr": lr, "meta_lr": hp.meta_lr, "steps": hp.steps,
               "edits_per_step": hp.edits_per_step, "val_size": hp.val_size,
               "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(),
               "history": record["history"]}
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("layers", "rank", "lr", "seconds")}),
              [(h["step"], round(h["ea"], 1), round(h["pa"], 1), round(h["na"], 1), round(h["meta"], 3))
               for h in row["history"]], flush=True)


if __name__ == "__main__":
    main()
