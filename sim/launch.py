"""Run the app under the real Flower runtime, on a SuperLink of our own.

`flwr run .` on its own talks to a detached SuperLink on fixed ports shared by everything on the
host; tests and sweeps instead start a private one (own FLWR_HOME, free port, file database), run
`flwr run . <connection> --stream`, check the outcome from the result file (the CLI exits 0 even
when the run failed) and stop the SuperLink.

    python -m sim.launch --clients 4 --run-config 'strategy="collabedit" dataset="counterfact"'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "0",
           "TOKENIZERS_PARALLELISM": "false"}


class FlowerRunFailed(RuntimeError):
    pass


def toml_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlowerRunFailed(f"flower-superlink exited with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.3)
    raise FlowerRunFailed(f"flower-superlink did not open port {port} within {timeout} s")


@contextlib.contextmanager
def superlink(log_path: Path, simulation: bool = True, database: Path | None = None):
    """A private SuperLink (a simulation engine, or one that real SuperNodes connect to); yields
    (environment, connection name, port)."""
    home = Path(tempfile.mkdtemp(prefix="collabedit-flwr-"))
    port = _free_port()
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, **OFFLINE, "FLWR_HOME": str(home),
           "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    (home / "config.toml").write_text(
        f'[superlink.private]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    cmd = [shutil.which("flower-superlink", path=env["PATH"]) or "flower-superlink", "--insecure",
           *(["--simulation"] if simulation else []), "--isolation", "subprocess",
           "--disable-runtime-dependency-installation", "--database",
           str(database or home / "state.db"), "--host", "127.0.0.1", "--port", str(port)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            _wait_for_port(port, proc)
            yield env, "private", port
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            shutil.rmtree(home, ignore_errors=True)


def flower_run(run_config: dict, *, clients: int, cpus_per_client: float = 1.0,
               log_path: Path | None = None, timeout: float | None = None,
               app_dir: Path = REPO) -> dict:
    """Run one simulation to the end; returns its summary.json (raises if it did not finish)."""
    if "results-dir" not in run_config or "run-name" not in run_config:
        raise ValueError("give results-dir and run-name: the summary file is how success is seen")
    if run_config.get("hparams-file"):  # the apps may start in Flower's folder, not this one
        run_config = {**run_config, "hparams-file": str(Path(run_config["hparams-file"]).resolve())}
    summary_path = Path(run_config["results-dir"]) / run_config["run-name"] / "summary.json"
    summary_path.unlink(missing_ok=True)
    log_path = log_path or summary_path.with_name("flower.log")
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
    if float(cpus_per_client).is_integer():  # Flower wants an integer here when it is one
        cpus_per_client = int(cpus_per_client)
    with superlink(log_path) as (env, connection, _):
        cmd = [shutil.which("flwr", path=env["PATH"]) or "flwr", "run", str(app_dir), connection,
               "--stream", "--run-config", overrides, "--federation-config",
               f"num-supernodes={clients} client-resources-num-cpus={cpus_per_client}"]
        with open(log_path, "ab") as log:
            subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                           check=False)
    return read_summary(summary_path, log_path)


def read_summary(summary_path: Path, log_path: Path) -> dict:
    """A finished run's summary; raises with the log's tail if the run did not finish."""
    if not summary_path.exists():
        tail = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""
        raise FlowerRunFailed(f"the Flower run wrote no {summary_path}; log {log_path}:\n{tail}")
    summary = json.loads(summary_path.read_text())
    if "error" in summary:
        raise FlowerRunFailed(f"the run failed: {summary['error']} (log {log_path})")
    if "finished" not in summary:
        raise FlowerRunFailed(f"the run stopped before the end; see {log_path}")
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--cpus-per-client", type=float, default=1.0)
    ap.add_argument("--run-config", default="", help="TOML key=value pairs, as for flwr run")
    args = ap.parse_args(argv)
    import tomllib

    rc = tomllib.loads("\n".join(shlex.split(args.run_config, posix=False)))
    rc.setdefault("results-dir", os.environ.get("COLLABEDIT_RESULTS", str(REPO / "results" / "runs")))
    rc.setdefault("run-name", time.strftime("run-%Y%m%d-%H%M%S"))
    summary = flower_run(rc, clients=args.clients, cpus_per_client=args.cpus_per_client)
    from .server_app import format_table

    print(format_table(summary))


if __name__ == "__main__":
    main()
