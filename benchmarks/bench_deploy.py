"""Load on a local deployment: N SuperNodes (one per party file, loopback), several rounds of
CollabEdit on real CounterFact with SmolLM2; prints and writes wall time per round, the peak
resident memory of every kind of process (sampled from /proc every second) and whether anything
was lost (a failed party, a request not scored).

    python benchmarks/bench_deploy.py --parties 8 --rounds 2 --edits 2 --out results/deploy/load-8x2.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from sim.deploy import run_deployed, write_party_files

KINDS = ("flower-superlink", "flower-supernode", "flwr-serverapp", "flwr-clientapp")


def _processes():
    """(kind, pid, rss MiB) of every Flower process on this machine."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            kind = next((k for k in KINDS if k in cmd), None)
            if kind is None:
                continue
            rss = next(int(l.split()[1]) for l in (proc / "status").read_text().splitlines()
                       if l.startswith("VmRSS:"))
            yield kind, int(proc.name), rss / 1024
        except (OSError, StopIteration, ValueError):
            continue


class MemorySampler(threading.Thread):
    def __init__(self, every: float = 1.0):
        super().__init__(daemon=True)
        self.every, self.stop = every, threading.Event()
        self.peak_total = 0.0
        self.peak_one = defaultdict(float)  # kind -> largest single process
        self.peak_kind = defaultdict(float)  # kind -> largest sum over that kind at one time
        self.most_clientapps = 0

    def run(self):
        while not self.stop.is_set():
            now = defaultdict(float)
            count = 0
            for kind, _, rss in _processes():
                now[kind] += rss
                self.peak_one[kind] = max(self.peak_one[kind], rss)
                count += kind == "flwr-clientapp"
            self.most_clientapps = max(self.most_clientapps, count)
            for kind, rss in now.items():
                self.peak_kind[kind] = max(self.peak_kind[kind], rss)
            self.peak_total = max(self.peak_total, sum(now.values()))
            self.stop.wait(self.every)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--parties", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--edits", type=int, default=2, help="per party and round")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per party")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="collabedit-load-"))
    files = write_party_files("counterfact", args.parties, args.edits * args.rounds,
                              work / "parties")
    rc = {"strategy": "collabedit", "dataset": "counterfact", "edits-per-client": args.edits,
          "num-server-rounds": args.rounds, "edit-mode": "parallel", "round-timeout": 3600.0,
          "results-dir": str(work), "run-name": "load"}
    sampler = MemorySampler()
    sampler.start()
    t0 = time.perf_counter()
    summary = run_deployed(files, rc, log_dir=work / "logs", threads=args.threads)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    rounds = summary["strategies"]["collabedit"]["rounds"]
    report = {
        "parties": args.parties, "rounds": args.rounds, "edits_per_party_and_round": args.edits,
        "threads_per_party": args.threads, "wall_s": wall,
        "seconds_per_round": [r["seconds_train"] + r["seconds_eval"] for r in rounds],
        "seconds_train_per_round": [r["seconds_train"] for r in rounds],
        "seconds_eval_per_round": [r["seconds_eval"] for r in rounds],
        "failed": [r["failed"] for r in rounds],
        "parties_merged_per_round": [len(r["client_metrics"]) for r in rounds],
        "requests_scored_last_round": rounds[-1]["metrics"].get("n"),
        "requests_sent": args.parties * args.edits * args.rounds,
        "score_per_round": [r["metrics"].get("score") for r in rounds],
        "bytes_up_per_party": summary["strategies"]["collabedit"]["bytes_up_per_client"],
        "peak_rss_mib_total": sampler.peak_total,
        "peak_rss_mib_one_process": dict(sampler.peak_one),
        "peak_rss_mib_per_kind": dict(sampler.peak_kind),
        "most_clientapps_at_once": sampler.most_clientapps,
        "server_peak_rss_mib": summary["server_peak_rss_mib"],
    }
    report["nothing_lost"] = (all(not f for f in report["failed"]) and
                              report["requests_scored_last_round"] == report["requests_sent"])
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
