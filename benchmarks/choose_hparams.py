"""How SmolLM2's edited layers and lam (mom2_update_weight) were chosen: a measured grid.

    python benchmarks/choose_hparams.py --n 32 --offset 200 --layer-sets 3-7,4-8,6-10 \
        --lams 15000,5000,2000,1000,500

z is optimised once per last edited layer (it depends on neither lam nor the earlier layers);
every (layer set, lam) then re-solves the layers and re-evaluates. Records come from an offset so the slow test's records (the first 32)
are not the ones tuned on. Prints one JSON line per setting.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from editing.data import load_requests
from editing.evaluate import evaluate
from editing.memit import compute_z, edit
from editing.update import applied
from editing.models import cache_dir, parse_layers
from editing.workspace import open_workspace


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="counterfact")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--offset", type=int, default=200)
    ap.add_argument("--layer-sets", default="3-7,4-8,6-10")
    ap.add_argument("--lams", default="15000,5000,2000,1000,500")
    ap.add_argument("--mode", default="sequential")
    args = ap.parse_args(argv)
    requests = load_requests(args.dataset, None, limit=args.n, offset=args.offset)
    by_z_layer: dict[int, list[list[int]]] = {}
    for layer_set in args.layer_sets.split(","):
        layers = parse_layers(layer_set.replace(";", ","))
        by_z_layer.setdefault(layers[-1], []).append(layers)
    for z_layer, layer_sets in by_z_layer.items():
        # z is read at the last edited layer only: one optimisation serves every set ending there
        union = sorted({l for layers in layer_sets for l in layers})
        ws = open_workspace("smollm2", layers=union)
        t0 = time.perf_counter()
        z = compute_z(ws.lm, requests, ws.hp, ws.templates, progress=True,
                      cache=cache_dir() / "z")
        tz = time.perf_counter() - t0
        for layers in layer_sets:
            for lam in [float(x) for x in args.lams.split(",")]:
                hp = ws.hp.with_overrides(layers=layers, mom2_update_weight=lam)
                # z comes back from the cache: only the layer solves differ between settings
                deltas = edit(ws.lm, requests, hp, {l: lam * ws.second_moments[l] for l in layers},
                              mode=args.mode, templates=ws.templates,
                              z_cache=cache_dir() / "z").deltas
                with applied(ws.lm, deltas):
                    post = evaluate(ws.lm.model, ws.lm.tok, requests).summary()
                print(json.dumps({"layers": f"{layers[0]}-{layers[-1]}", "lam": lam,
                                  "mode": args.mode, "n": len(requests), "offset": args.offset,
                                  "z_seconds": round(tz, 1),
                                  "p_target": round(float(z.p_target.mean()), 3),
                                  **{k: round(v, 2) for k, v in post.items()}}), flush=True)


if __name__ == "__main__":
    main()
