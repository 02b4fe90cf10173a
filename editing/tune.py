"""Fit MEMIT to a model nobody preset: measure which layers to edit and how hard to hold on to C0.

    python -m editing.tune --model smollm2                    # installs the preset it measures
    python -m editing.tune --model gemma3-270m --out results/hparams/gemma3-270m.json
    python -m editing.tune --model /path/to/any-hf-causal-lm --windows 4-8,6-10 --lams 5000,1000

On a slice of real records kept apart from evaluation (CounterFact positions 200-231 by default;
the tests and the reported runs start at 0) it edits the records with every setting of a grid and
scores each (ES, PS, NS, Score as MEMIT defines them):

- layer windows: `--width` consecutive layers (5, MEMIT's usual spread; 1 for a family whose MLP
  output is normalised before the residual, which MEMIT can edit at one layer only) ending at an
  eighth, a quarter, three eighths and half of the depth, or the windows given;
- lam (`mom2_update_weight`): C = lam * E[k k^T].

z depends on neither lam nor the earlier layers of a window, so it is optimised once per window
end and reused by every setting that ends there. The choice: among the settings within
`--tolerance` Score points of the best (what 32 records resolve: one record moves ES or PS by ~3),
the largest lam (the most weight on what the model already does), then the best NS, then the best
Score. The table and the choice are printed; the preset file (editing.models.read_preset) is
written to `--out`, by default into the user cache under the model's fingerprint, where every
later run on that model finds it (and says so in its log).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import dataset_options, load_requests
from .evaluate import SCORE_KEYS, evaluate
from .memit import compute_z, context_templates, edit, fixed_covariance
from .models import (LoadedModel, cache_dir, check_layers, load_model, module, parse_layers,
                     preset_path, write_preset)
from .stats import StopForward, missing_layers, second_moments, wiki_texts
from .update import applied

log = logging.getLogger(__name__)

DEFAULT_LAMS = (15000.0, 5000.0, 3000.0, 2000.0, 1000.0, 500.0)
FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2)
RULE = ("among settings within {tol} Score points of the best: the largest lam, then the best "
        "locality (NS or NA), then the best Score")


def auto_windows(n_layers: int, width: int) -> list[list[int]]:
    """`width` consecutive layers ending at each of FRACTIONS of the depth (distinct, in range)."""
    out = []
    for f in FRACTIONS:
        end = max(width - 1, int(n_layers * f + 0.5))
        window = list(range(end - width + 1, end + 1))
        if end < n_layers - 1 and window not in out:
            out.append(window)
    return out


def _keys(rows) -> tuple[str, str, str]:
    """The efficacy, generalisation and locality keys of the rows' metric kind (es/ps/ns or
    ea/pa/na)."""
    return next(keys for keys in SCORE_KEYS.values() if keys[0] in rows[0])


def choose(rows: list[dict], tolerance: float) -> dict:
    locality = _keys(rows)[2]
    best = max(r["score"] for r in rows)
    near = [r for r in rows if r["score"] >= best - tolerance]
    return max(near, key=lambda r: (r["lam"], r[locality], r["score"]))


def table(rows: list[dict], chosen: dict | None = None) -> str:
    keys = [*_keys(rows), "score"]
    lines = ["| layers | lam | " + " | ".join(k.upper() if k != "score" else "Score" for k in keys)
             + " |", "| --- | ---: |" + " ---: |" * len(keys)]
    for r in rows:
        mark = "**" if r is chosen else ""
        cells = [r["layers"], f"{r['lam']:g}"] + [f"{r[k]:.1f}" for k in keys]
        lines.append("| " + " | ".join(f"{mark}{c}{mark}" for c in cells) + " |")
    return "\n".join(lines)


def _label(layers) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def _stats_seconds(lm: LoadedModel, layers, sample_size, max_length, data_dir) -> float:
    """Seconds the second moments still missing from the cache will take: one batch timed."""
    todo = missing_layers(lm, layers, sample_size, max_length, data_dir)
    if not todo:
        return 0.0
    batch = lm.tok(wiki_texts(16, data_dir), return_tensors="pt", padding=True, truncation=True,
                   max_length=max_length).to(lm.device)
    stop = max(todo)

    def halt(_m, _a):
        raise StopForward
    handle = module(lm.model, lm.spec.rewrite.format(stop)).register_forward_pre_hook(halt)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            lm.model(**batch, use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    return (time.perf_counter() - t0) * math.ceil(sample_size / 16)


def _z_seconds(lm: LoadedModel, requests, hp, templates) -> float:
    """Seconds z takes for `requests`: one chunk's first pass and two of its steps timed, scaled
    to every step of every chunk (an upper bound: requests that stop early cost less)."""
    chunk = requests[:hp.z_batch_size]
    t0 = time.perf_counter()
    compute_z(lm, chunk, hp.with_overrides(v_num_grad_steps=1), templates)  # first pass only
    t1 = time.perf_counter()
    compute_z(lm, chunk, hp.with_overrides(v_num_grad_steps=3), templates)  # + two steps
    step = max(0.0, (time.perf_counter() - t1) - (t1 - t0)) / 2
    return math.ceil(len(requests) / len(chunk)) * ((t1 - t0) + step * (hp.v_num_grad_steps - 1))


def tune(model: str = "smollm2", *, dataset: str = "counterfact", dataset_path=None, n: int = 32,
         offset: int = 200, windows=None, width: int = 0, lams=DEFAULT_LAMS,
         mode: str = "sequential", tolerance: float = 1.0, cov_samples: int = 1000,
         cov_max_length: int = 256, data_dir=None, dtype: str = "float32", device: str = "",
         out=None, rows_out=None) -> dict:
    t_start = time.perf_counter()
    lm = load_model(model, device=device or None, dtype=dtype)
    base = lm.spec.hparams
    width = width or (1 if lm.spec.mlp_post else 5)
    if windows:
        windows = [parse_layers(w.replace(";", ",")) for w in windows]
    else:
        windows = auto_windows(lm.model.config.num_hidden_layers, width)
    for w in windows:
        check_layers(lm, w)  # refuse a window this model cannot take before minutes are spent
    lams = [float(x) for x in lams]
    requests = load_requests(dataset, dataset_path, limit=n, offset=offset,
                             **dataset_options(dataset))
    templates = context_templates(lm, base.context_templates, base.context_template_tokens)
    by_end: dict[int, list[list[int]]] = {}
    for w in windows:
        by_end.setdefault(w[-1], []).append(w)
    union = sorted({l for w in windows for l in w})

    t0 = time.perf_counter()
    pre = evaluate(lm.model, lm.tok, requests).summary()
    eval_s = time.perf_counter() - t0
    stats_s = _stats_seconds(lm, union, cov_samples, cov_max_length, data_dir)
    z_s = _z_seconds(lm, requests, base.with_overrides(layers=windows[0]), templates)
    settings = len(windows) * len(lams)
    estimate = stats_s + z_s * len(by_end) + settings * (eval_s + 2.0)
    print(f"tuning MEMIT for {model} ({lm.model.config.model_type}, "
          f"{lm.model.config.num_hidden_layers} layers) on {len(requests)} {dataset} records "
          f"from position {offset}: {len(windows)} layer windows x {len(lams)} lams = {settings} "
          f"settings, z optimised for {len(by_end)} window ends.\n"
          f"estimate: {estimate / 60:.0f} min (second moments {stats_s / 60:.1f}, z "
          f"{z_s * len(by_end) / 60:.1f}, {settings} edits and evaluations "
          f"{settings * (eval_s + 2.0) / 60:.1f}); unedited: "
          + ", ".join(f"{k} {v:.1f}" for k, v in pre.items()), flush=True)

    moments = second_moments(lm, union, sample_size=cov_samples, max_length=cov_max_length,
                             data_dir=data_dir)
    rows: list[dict] = []
    seconds = {"z": 0.0, "edit+evaluate": 0.0}
    with tqdm(total=settings, desc="settings", unit="setting") as bar:
        for end, group in by_end.items():
            t = time.perf_counter()
            z = compute_z(lm, requests, base.with_overrides(layers=group[0]), templates,
                          progress=True, cache=cache_dir() / "z")
            seconds["z"] += time.perf_counter() - t
            for layers in group:
                for lam in lams:
                    t = time.perf_counter()
                    hp = base.with_overrides(layers=layers, mom2_update_weight=lam)
                    result = edit(lm, requests, hp, fixed_covariance(
                        {l: moments[l] for l in layers}, lam), mode=mode, templates=templates,
                        z=z)
                    with applied(lm, result.deltas):
                        post = evaluate(lm.model, lm.tok, requests).summary()
                    seconds["edit+evaluate"] += time.perf_counter() - t
                    rows.append({"layers": _label(layers), "lam": lam, **post,
                                 "p_target": round(float(z.p_target.mean()), 3)})
                    bar.set_postfix_str(f"{_label(layers)} lam {lam:g}: Score {post['score']:.1f}")
                    bar.update(1)
                    if rows_out:
                        Path(rows_out).parent.mkdir(parents=True, exist_ok=True)
                        with open(rows_out, "a") as f:
                            f.write(json.dumps({"model": model, "mode": mode, "n": len(requests),
                                                "offset": offset, **rows[-1]}) + "\n")
    chosen = choose(rows, tolerance)
    best = max(rows, key=lambda r: r["score"])
    if best["lam"] == min(lams) and len(lams) > 1:
        # the measurement has not bracketed the optimum: a smaller lam may score better still
        log.warning("the best Score (%.1f, layers %s) is at the smallest lam measured (%g): "
                    "extend --lams below it", best["score"], best["layers"], best["lam"])
    hp = base.with_overrides(layers=parse_layers(chosen["layers"]),
                             mom2_update_weight=chosen["lam"])
    total = time.perf_counter() - t_start
    out = Path(out) if out else preset_path(lm.fingerprint)
    report = {"model": model, "model_type": lm.model.config.model_type,
              "fingerprint": lm.fingerprint,
              "records": {"dataset": dataset, "n": len(requests), "offset": offset},
              "mode": mode, "chosen_by": RULE.format(tol=tolerance), "chosen": chosen,
              "unedited": pre, "measured": rows,
              "seconds": {"estimate": round(estimate, 1), "total": round(total, 1),
                          **{k: round(v, 1) for k, v in seconds.items()}},
              "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                          "device": str(lm.device)}}
    write_preset(out, hp, **report)
    print(table(rows, chosen))
    print(f"chosen: layers {chosen['layers']}, lam {chosen['lam']:g} "
          f"({RULE.format(tol=tolerance)}); {total / 60:.1f} min (estimated "
          f"{estimate / 60:.0f}); preset written to {out}")
    return report


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="a short name, a Hugging Face id or a folder")
    ap.add_argument("--dataset", default="counterfact")
    ap.add_argument("--dataset-path", default=None)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--offset", type=int, default=200,
                    help="first record position: keep it apart from the records you evaluate on")
    ap.add_argument("--windows", default=None,
                    help='layer windows, e.g. "4-8,6-8,2-8"; default: see above')
    ap.add_argument("--width", type=int, default=0, help="layers per automatic window")
    ap.add_argument("--lams", default=",".join(f"{x:g}" for x in DEFAULT_LAMS))
    ap.add_argument("--mode", choices=["sequential", "parallel"], default="sequential")
    ap.add_argument("--tolerance", type=float, default=1.0)
    ap.add_argument("--cov-samples", type=int, default=1000)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="")
    ap.add_argument("--out", default=None, help="the preset file; default: the user cache")
    ap.add_argument("--rows", default=None, help="also append each measured row here (JSONL)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return tune(a.model, dataset=a.dataset, dataset_path=a.dataset_path, n=a.n, offset=a.offset,
                windows=a.windows.split(",") if a.windows else None, width=a.width,
                lams=a.lams.split(","), mode=a.mode, tolerance=a.tolerance,
                cov_samples=a.cov_samples, dtype=a.dtype, device=a.device, out=a.out,
                rows_out=a.rows)


if __name__ == "__main__":
    main()
