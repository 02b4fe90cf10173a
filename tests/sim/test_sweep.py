"""A tiny sweep end to end: grid expansion, runs, resume, CSV / Markdown / PNG."""

import csv
import json

from sim.sweep import expand, sweep


def test_tiny_sweep_writes_csv_and_resumes(tiny, tmp_path):
    spec = {"name": "tiny", "title": "tiny sweep", "x": "total-edits",
            "base": {"strategy": "unedited,collabedit,simple-average", "dataset": "demo",
                     "edit-mode": "parallel"},
            "grid": {"edits-per-client": [1, 2]}, "clients": [2]}
    csv_path = sweep(spec, tmp_path / "tiny")
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 2 * 3
    assert {r["strategy"] for r in rows} == {"unedited", "collabedit", "simple-average"}
    assert sorted({int(r["total-edits"]) for r in rows}) == [2, 4]
    for r in rows:
        assert 0 <= float(r["es"]) <= 100 and r["failed"] == "0"
    assert (tmp_path / "tiny" / "score.png").stat().st_size > 1000
    md = (tmp_path / "tiny" / "summary.md").read_text()
    assert md.startswith("# tiny sweep") and md.count("| collabedit |") == 2
    # resume: finished runs are read back, not redone
    run = next((tmp_path / "tiny" / "runs").iterdir()) / "summary.json"
    stamp = json.loads(run.read_text())["finished"]
    sweep(spec, tmp_path / "tiny")
    assert json.loads(run.read_text())["finished"] == stamp


def test_total_edits_split_over_clients():
    spec = {"base": {"strategy": "all"}, "grid": {}, "clients": [2, 4], "total-edits": 8}
    assert [(c, rc["edits-per-client"]) for c, rc in expand(spec)] == [(2, 4), (4, 2)]
