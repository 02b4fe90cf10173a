"""The CollabEdit protocol at the paper's shapes, on synthetic payloads: bytes, server time, server
memory and exactness of one merged layer (GPT-J's MLP output projection: d_in 16384, d_out 4096).

    python benchmarks/bench_protocol.py                      # GPT-J shapes, 5000 edits, 2/10/50 clients
    python benchmarks/bench_protocol.py --d-in 2048 --d-out 512 --total-edits 400   # a quick look

Synthetic data: keys K (d_in x total) and residuals R (d_out x total) are Gaussian; C = lam C0
with a synthetic PSD C0 = diag(c) + W0 W0^T (W0: d_in x 64), the conditioning of a real one in
spirit, not in detail. Clients hold contiguous slices of the edits. A client's factored message
is F = U sqrt(w) = K_i V and G = R_i V for an orthogonal n x n V (`strategies.payload`); the
server's work and the bytes are the same for every factor of that shape, so the clients here send
F = K_i and G = R_i themselves and skip their own O(d_in n^2) factorisation (`--canonical`
computes the canonical factors with `payload.factor_keys` instead).

Each client count runs the server in its own subprocess, so the peak RSS it reports (getrusage)
is that configuration's alone. The server does what `strategies.flower` does per layer: build
its C, then for each reply in turn load it (decode once), validate it (`validate_layer_payload`),
fold it (`CollabEdit.add`) and drop it, then solve (`CollabEdit.result`: one Cholesky). GLOBAL is
computed apart, from all keys at once by the Woodbury identity with C's diagonal-plus-low-rank
form (a different algorithm, so the relative difference is a real check), and compared row block
by row block.

Today's protocol (before factored payloads) ran a full eigvalsh of every client's d_in x d_in
K K^T to check it is PSD, and one more of C + sum K K^T for the condition number: that
eigvalsh is timed once and multiplied (clients + 1), a lower bound on today's server time (its
fold and LU solve are left out). `--eig-d` times it at a smaller size instead and scales it by
(d_in / eig-d)^3 (its cost is cubic), for CPUs where one eigvalsh at d_in takes too long; the
JSON says which. Its bytes are computed: packed K K^T plus R K^T, float64.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LAM = 15000.0  # GPT-J's mom2_update_weight
LOW_RANK = 64


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def c0_parts(d_in: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """C0 = diag(c) + W0 W0^T, returned as (c, W0): a PSD second moment with a spread spectrum."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.05, 1.0, d_in) / d_in
    w0 = rng.standard_normal((d_in, LOW_RANK)) * np.sqrt(rng.uniform(0.1, 10.0, LOW_RANK)) / d_in
    return c, w0


def server_cov(d_in: int, seed: int) -> np.ndarray:
    """C = lam C0 as a fresh dense array (what EditStrategy.covariance hands the merge)."""
    c, w0 = c0_parts(d_in, seed)
    cov = w0 @ w0.T
    cov[np.diag_indices(d_in)] += c
    cov *= LAM
    return cov


def keys_and_residuals(args) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(args.seed + 1)
    # a key's squared norm ~ lam * trace(C0) / 10: the edits matter but do not swamp C
    k = rng.standard_normal((args.d_in, args.total_edits)) * np.sqrt(LAM / args.d_in / 10)
    r = rng.standard_normal((args.d_out, args.total_edits))
    return k, r


def global_edit(k: np.ndarray, r: np.ndarray, d_in: int, seed: int) -> np.ndarray:
    """R K^T (C + K K^T)^{-1} with C + K K^T = D + W W^T, W = [sqrt(lam) W0, K], by Woodbury."""
    c, w0 = c0_parts(d_in, seed)
    dinv = 1.0 / (LAM * c)
    w = np.concatenate([np.sqrt(LAM) * w0, k], axis=1)
    dw = dinv[:, None] * w  # D^{-1} W
    small = np.eye(w.shape[1]) + w.T @ dw
    mdw = r @ (k.T @ dw)  # M D^{-1} W with M = R K^T
    y = np.linalg.solve(small, mdw.T).T
    out = (r @ k.T) * dinv[None, :]
    out -= y @ dw.T
    return out


def generate(args, work: Path) -> dict:
    """Every configuration's client payloads on disk (as a server would receive them), GLOBAL."""
    k, r = keys_and_residuals(args)
    t0 = time.perf_counter()
    ref = global_edit(k, r, args.d_in, args.seed)
    t_global = time.perf_counter() - t0
    ref.tofile(work / "global.f64")
    del ref
    sizes = {}
    for n_clients in args.clients:
        edits = args.total_edits // n_clients
        folder = work / f"c{n_clients}"
        folder.mkdir()
        for i in range(n_clients):
            cols = slice(i * edits, (i + 1) * edits)
            if args.canonical:
                from strategies.payload import factor_keys

                fields = factor_keys(k[:, cols], r[:, cols])
            else:
                fields = {"kkt-factor": k[:, cols], "rkt-factor": r[:, cols]}
            for dtype in ("float64",) + (("float32",) if n_clients == args.f32_clients else ()):
                for field, value in fields.items():
                    np.save(folder / f"{i}.{field}.{dtype}.npy", value.astype(dtype))
            rank = fields["kkt-factor"].shape[1]
            sizes[n_clients] = {"edits_per_client": edits, "rank": rank,
                                "factored_f64": 8 * rank * (args.d_in + args.d_out),
                                "factored_f32": 4 * rank * (args.d_in + args.d_out)}
    return {"sizes": sizes, "seconds_global_reference": t_global}


def serve(args, work: Path, n_clients: int, dtype: str) -> dict:
    """One configuration's server, in this (fresh) process."""
    from strategies.merge import CollabEdit, validate_layer_payload

    folder = work / f"c{n_clients}"
    edits = args.total_edits // n_clients
    t = {"validate": 0.0, "fold": 0.0}
    t0 = time.perf_counter()
    # as the ServerApp: its workspace holds C0 for the run, and each merge gets a fresh C
    # (EditStrategy.covariance) that becomes the merge's work array
    lam_c0 = server_cov(args.d_in, args.seed)
    acc = CollabEdit(lam_c0.copy(), name="bench layer", overwrite_cov=True)
    t_cov = time.perf_counter() - t0
    for i in range(n_clients):
        fields = {f: np.load(folder / f"{i}.{f}.{dtype}.npy") for f in ("kkt-factor", "rkt-factor")}
        t0 = time.perf_counter()
        validate_layer_payload(fields, wanted=("rkt", "kkt"), d_out=args.d_out, d_in=args.d_in,
                               client=str(i), layer="bench", max_rank=edits)
        t1 = time.perf_counter()
        acc.add(fields)
        t2 = time.perf_counter()
        t["validate"] += t1 - t0
        t["fold"] += t2 - t1
        del fields
    t0 = time.perf_counter()
    merged = acc.result()
    t["solve"] = time.perf_counter() - t0
    # relative difference to GLOBAL, reading it in row blocks (no second d_out x d_in array)
    num = den = 0.0
    block = 256
    with open(work / "global.f64", "rb") as f:
        for i0 in range(0, args.d_out, block):
            rows = min(block, args.d_out - i0)
            ref = np.fromfile(f, dtype=np.float64, count=rows * args.d_in).reshape(rows, args.d_in)
            num += float(np.sum((merged[i0:i0 + rows] - ref) ** 2))
            den += float(np.sum(ref ** 2))
    return {"clients": n_clients, "edits_per_client": edits, "dtype": dtype,
            "seconds": {**t, "total": sum(t.values()), "build_cov": t_cov},
            "peak_rss_bytes": peak_rss_bytes(),
            "rel_diff_vs_global": float(np.sqrt(num / den))}


def time_eigvalsh(args) -> dict:
    """Today's per-client PSD check (and the merge's own eigvalsh), timed once at eig-d."""
    d = args.eig_d or args.d_in
    a = server_cov(d, args.seed)
    t0 = time.perf_counter()
    np.linalg.eigvalsh(a)
    measured = time.perf_counter() - t0
    return {"d_timed": d, "seconds_timed": measured, "d": args.d_in,
            "seconds": measured * (args.d_in / d) ** 3,
            "scaled": d != args.d_in, "peak_rss_bytes": peak_rss_bytes()}


def child(args, *what) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", *map(str, what)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{what[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--d-in", type=int, default=16384)
    ap.add_argument("--d-out", type=int, default=4096)
    ap.add_argument("--total-edits", type=int, default=5000)
    ap.add_argument("--clients", default="2,10,50")
    ap.add_argument("--f32-clients", type=int, default=10, help="also run this config in float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eig-d", type=int, default=0,
                    help="time today's eigvalsh at this size and scale it cubically (0: at d_in)")
    ap.add_argument("--canonical", action="store_true",
                    help="clients send the canonical factors (payload.factor_keys), not K, R")
    ap.add_argument("--work", type=Path, default=None, help="payload folder (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "protocol" / "bench-protocol.json")
    ap.add_argument("--resummarise", action="store_true",
                    help="recompute the summary of --out's measurements, measuring nothing")
    ap.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.clients = [int(x) for x in str(args.clients).split(",")]
    if args.child:  # a subprocess: one measurement, JSON on the last line of stdout
        kind, work = args.child[0], Path(args.child[1])
        res = (time_eigvalsh(args) if kind == "eigvalsh"
               else serve(args, work, int(args.child[2]), args.child[3]))
        print(json.dumps(res))
        return
    for n in args.clients:
        if args.total_edits % n:
            raise SystemExit(f"{args.total_edits} edits do not split over {n} clients")
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    state = {"eig": None, "runs": []}
    if args.resummarise:
        old = json.loads(args.out.read_text())
        raw = ("clients", "edits_per_client", "dtype", "seconds", "peak_rss_bytes",
               "rel_diff_vs_global")
        gen = {**old["generate"], "sizes": {int(k): v for k, v in old["generate"]["sizes"].items()}}
        result = summarise(args, gen, old["eigvalsh"],
                           [{k: r[k] for k in raw} for r in old["runs"]], old["threads"])
        result["finished"] = old["finished"]
        args.out.write_text(json.dumps(result, indent=1))
        print(table(result))
        return

    def save(finished: bool) -> dict:  # after every measurement: an interrupted run keeps them
        result = summarise(args, gen, state["eig"], state["runs"], threads)
        result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S") if finished else None
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        return result

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        gen = generate(args, work)
        gen["seconds"] = time.perf_counter() - t0
        print(f"payloads generated in {gen['seconds']:.0f} s", flush=True)
        # the client counts first (they make the peak-RSS comparison), then today's baseline
        order = sorted(args.clients, key=lambda n: n != 10)
        for n in order:
            state["runs"].append(child(args, "serve", work, n, "float64"))
            print(json.dumps(state["runs"][-1]), flush=True)
            save(False)
        state["eig"] = child(args, "eigvalsh", work)
        print(f"eigvalsh at d={state['eig']['d_timed']}: {state['eig']['seconds_timed']:.1f} s -> "
              f"{state['eig']['seconds']:.1f} s at d={args.d_in}", flush=True)
        save(False)
        if args.f32_clients in args.clients:
            state["runs"].append(child(args, "serve", work, args.f32_clients, "float32"))
            print(json.dumps(state["runs"][-1]), flush=True)
    result = save(True)
    print(table(result))
    print(f"written to {args.out}")


def summarise(args, gen: dict, eig: dict | None, runs: list[dict], threads: str) -> dict:
    dense_f64 = 8 * (args.d_in * (args.d_in + 1) // 2 + args.d_out * args.d_in)
    rows = []
    for run in runs:
        n = run["clients"]
        size = gen["sizes"][n]
        today = (n + 1) * eig["seconds"] if eig else None
        rows.append({**run, "bytes_per_client_per_layer": {
            "dense_f64_today": dense_f64, "factored_f64": size["factored_f64"],
            "factored_f32": size["factored_f32"]},
            "dense_over_factored_f64": dense_f64 / size["factored_f64"],
            "today_server_seconds_lower_bound": today,
            "speedup_vs_today": today / run["seconds"]["total"] if today else None})
    f64 = [r for r in rows if r["dtype"] == "float64"]
    rss = [r["peak_rss_bytes"] for r in f64]
    spread = (max(rss) - min(rss)) / min(rss) if rss else None
    ten = next((r for r in f64 if r["clients"] == 10), None)
    return {
        "shapes": {"d_in": args.d_in, "d_out": args.d_out, "total_edits": args.total_edits,
                   "lam": LAM, "c0_low_rank": LOW_RANK},
        "clients_send": "canonical factors" if args.canonical else "K_i and R_i as the factors",
        "threads": threads, "cpus": os.cpu_count(), "eigvalsh": eig, "generate": gen, "runs": rows,
        "done_when": {
            # the setting: 10 clients x 500 edits (a client's bytes grow with its edits)
            "factored_bytes_at_most_dense_over_15": (
                ten["bytes_per_client_per_layer"]["factored_f64"] * 15 <= dense_f64 if ten else None),
            "server_seconds_10_clients_at_most_today_over_10": (
                ten["speedup_vs_today"] >= 10 if ten and ten["speedup_vs_today"] else None),
            "peak_rss_spread": spread,
            "peak_rss_within_10_percent": spread <= 0.10 if spread is not None else None,
        },
    }


def table(result: dict) -> str:
    mib = 2 ** 20
    lines = [f"one layer d_in {result['shapes']['d_in']} x d_out {result['shapes']['d_out']}, "
             f"{result['shapes']['total_edits']} edits in all; today's per-client eigvalsh "
             f"{result['eigvalsh']['seconds']:.1f} s at d_in" + (
                 f" (timed at d={result['eigvalsh']['d_timed']}: "
                 f"{result['eigvalsh']['seconds_timed']:.1f} s, scaled by (d_in/d)^3)"
                 if result["eigvalsh"]["scaled"] else ""),
             "| clients | edits/client | dtype | MiB/client dense f64 (today) | factored f64 | "
             "factored f32 | validate s | fold s | solve s | total s | today's s (>=) | "
             "speed-up | peak RSS MiB | rel. diff vs GLOBAL |",
             "|" + "---|" * 14]
    for r in result["runs"]:
        b, s = r["bytes_per_client_per_layer"], r["seconds"]
        lines.append(
            f"| {r['clients']} | {r['edits_per_client']} | {r['dtype']} | {b['dense_f64_today'] / mib:.0f} | "
            f"{b['factored_f64'] / mib:.1f} | {b['factored_f32'] / mib:.1f} | {s['validate']:.2f} | "
            f"{s['fold']:.1f} | {s['solve']:.1f} | {s['total']:.1f} | "
            f"{r['today_server_seconds_lower_bound']:.0f} | {r['speedup_vs_today']:.1f}x | "
            f"{r['peak_rss_bytes'] / mib:.0f} | {r['rel_diff_vs_global']:.2e} |")
    lines.append("done when: " + json.dumps(result["done_when"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
