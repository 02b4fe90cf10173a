"""A local deployment: a SuperLink that is not a simulation, one `flower-supernode` process per
party, each with its own node config and its own request file, and the run; torn down at the end.
The ServerApp and ClientApp are the ones `flwr run` simulates; only where requests come from
changes (run config `requests-from="node"`: each party reads the file its node config names).

    python -m sim.deploy split --dataset counterfact --parties 4 --edits 8 --out parties/
    python -m sim.deploy run --parties parties/ \\
        --run-config 'strategy="collabedit,simple-average" dataset="counterfact" edits-per-client=8'

Across machines the same steps run by hand (README, "Deployment"): `flower-superlink` on one
machine, `flower-supernode --superlink <host>:<port> --node-config 'partition-id=<i>
num-partitions=<n> requests-path="<file>"'` on each party's, then `flwr run . <connection>`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from editing.data import dataset_options, load_requests, partition, source_records

from .launch import REPO, FlowerRunFailed, _free_port, read_summary, superlink, toml_value


def write_party_files(dataset: str, parties: int, per_party: int, out: Path,
                      dataset_path: str | None = None) -> list[Path]:
    """The first parties x per_party usable records of `dataset`, split as the simulation splits
    them (contiguous partitions), one file per party in the dataset's own format."""
    requests = load_requests(dataset, dataset_path, limit=parties * per_party,
                             **dataset_options(dataset))
    if len(requests) < parties * per_party:
        raise ValueError(f"{dataset} has {len(requests)} usable records; {parties} parties x "
                         f"{per_party} need {parties * per_party}")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(partition(requests, parties, mode="contiguous")):
        path = out / f"party-{i}.json"
        path.write_text(json.dumps(source_records(dataset, dataset_path, part), indent=1))
        paths.append(path)
    return paths


def party_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("party-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    if not files:
        raise FileNotFoundError(f"{folder} holds no party-<i>.json files (python -m sim.deploy split)")
    return files


@dataclass
class Deployment:
    """A running SuperLink and its SuperNodes (`nodes[i]` serves party i)."""

    env: dict
    connection: str
    port: int
    files: list[Path]
    log_dir: Path
    threads: int
    nodes: dict[int, subprocess.Popen] = field(default_factory=dict)

    def start_node(self, i: int) -> subprocess.Popen:
        config = (f"partition-id={i} num-partitions={len(self.files)} "
                  f"requests-path={json.dumps(str(self.files[i].resolve()))}")
        cmd = [shutil.which("flower-supernode", path=self.env["PATH"]) or "flower-supernode",
               "--insecure", "--superlink", f"127.0.0.1:{self.port}", "--port", str(_free_port()),
               "--isolation", "subprocess", "--node-config", config]
        env = {**self.env, "OMP_NUM_THREADS": str(self.threads)}
        log = open(self.log_dir / f"supernode-{i}.log", "ab")
        self.nodes[i] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self.nodes[i]

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """The party's SuperNode and the ClientApp it started, as a crashed machine would go."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.nodes[i].pid, sig)
        self.nodes[i].wait(30)

    def stop(self) -> None:
        for i, proc in self.nodes.items():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.nodes.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def deployment(files: list[Path], log_dir: Path, threads: int = 1):
    """SuperLink (file database, insecure, loopback) plus one SuperNode per party file."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with superlink(log_dir / "superlink.log", simulation=False,
                   database=log_dir / "superlink.db") as (env, connection, port):
        dep = Deployment(env=env, connection=connection, port=port, files=list(files),
                         log_dir=log_dir, threads=threads)
        try:
            for i in range(len(files)):
                dep.start_node(i)
            yield dep
        finally:
            dep.stop()


def submit(dep: Deployment, run_config: dict, *, stream: bool = True,
           timeout: float | None = None) -> subprocess.Popen | None:
    """`flwr run` of this app on the deployment: waits for the end with `stream`, else returns
    the submitting process at once."""
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
    cmd = [shutil.which("flwr", path=dep.env["PATH"]) or "flwr", "run", str(REPO), dep.connection,
           *(["--stream"] if stream else []), "--run-config", overrides]
    log = open(dep.log_dir / "flwr-run.log", "ab")
    if stream:
        subprocess.run(cmd, env=dep.env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                       check=False)
        return None
    return subprocess.Popen(cmd, env=dep.env, stdout=log, stderr=subprocess.STDOUT)


def run_deployed(files: list[Path], run_config: dict, *, log_dir: Path, threads: int = 1,
                 timeout: float | None = None) -> dict:
    """Start, run to the end, tear down; the run's summary.json (raises if it did not finish)."""
    if "results-dir" not in run_config or "run-name" not in run_config:
        raise ValueError("give results-dir and run-name: the summary file is how success is seen")
    run_config = {"requests-from": "node", **run_config}
    summary = Path(run_config["results-dir"]) / run_config["run-name"] / "summary.json"
    summary.unlink(missing_ok=True)
    with deployment(files, log_dir, threads) as dep:
        submit(dep, run_config, timeout=timeout)
    return read_summary(summary, log_dir / "flwr-run.log")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("split", help="write one request file per party")
    sp.add_argument("--dataset", default="counterfact")
    sp.add_argument("--dataset-path", default=None)
    sp.add_argument("--parties", type=int, default=4)
    sp.add_argument("--edits", type=int, default=8, help="requests per party")
    sp.add_argument("--out", type=Path, required=True)
    rp = sub.add_parser("run", help="start a local deployment, run, tear it down")
    rp.add_argument("--parties", type=Path, required=True, help="folder of party-<i>.json")
    rp.add_argument("--threads", type=int, default=1, help="torch threads per party")
    rp.add_argument("--run-config", default="", help="TOML key=value pairs, as for flwr run")
    args = ap.parse_args(argv)
    if args.command == "split":
        for path in write_party_files(args.dataset, args.parties, args.edits, args.out,
                                      args.dataset_path):
            print(path)
        return
    import tomllib

    rc = tomllib.loads("\n".join(shlex.split(args.run_config, posix=False)))
    rc.setdefault("results-dir", os.environ.get("COLLABEDIT_RESULTS", str(REPO / "results" / "runs")))
    rc.setdefault("run-name", time.strftime("deploy-%Y%m%d-%H%M%S"))
    run_dir = Path(rc["results-dir"]) / rc["run-name"]
    try:
        summary = run_deployed(party_files(args.parties), rc, log_dir=run_dir / "logs",
                               threads=args.threads)
    except FlowerRunFailed as err:
        sys.exit(str(err))
    from .server_app import format_table

    print(format_table(summary))


if __name__ == "__main__":
    main()
