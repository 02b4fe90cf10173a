"""The Flower app with editor="malmen" over an in-process grid, on a tiny float64 Llama: one round
of CollabEdit equals GLOBAL, also over two rounds with the dynamic covariance, and every strategy
runs on MALMEN's payloads."""

import pytest
import torch

import clients.client_app as client_app
import sim.config as config
import sim.server_app as server_app
from editing import malmen
from editing.models import wrap_model
from tests.editing.test_malmen import REQUESTS as ZSRE
from tests.helpers import tiny_model, tiny_tokenizer
from tests.sim.test_app import run


@pytest.fixture
def tiny_malmen(monkeypatch, tmp_path):
    lm = wrap_model(tiny_model("llama"), tiny_tokenizer("llama"), "tiny-llama")
    hp = malmen.MalmenHparams(layers=(1, 2), rank=8, lr=1e-2)
    net = malmen.new_net(lm, hp)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a non-trivial network: the identity one would hide mistakes
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    keys, grads = malmen.keys_and_grads(lm, ZSRE, hp.layers)
    for l in hp.layers:
        net.normalizer.update(torch.cat((keys[l], grads[l]), -1))
    net.normalizer.frozen.fill_(True)
    ws = malmen.MalmenWorkspace(lm=lm, hp=hp, net=net)
    monkeypatch.setattr(client_app, "workspace", lambda cfg: ws)
    monkeypatch.setattr(server_app, "server_workspace", lambda cfg: ws)
    monkeypatch.setattr(config, "load_requests", lambda *a, **k: (ZSRE + ZSRE[:2])[: k.get("limit")])
    monkeypatch.setenv("COLLABEDIT_CACHE", str(tmp_path / "cache"))
    config._SPLITS.clear()
    return ws


def test_malmen_collabedit_equals_global(tiny_malmen, tmp_path):
    summary, _ = run(tmp_path, clients=3, editor="malmen", dataset="zsre")
    gaps = summary["collabedit_vs_global_rel_diff"]
    assert set(gaps) == {"1", "2"} and max(gaps.values()) <= 1e-8, gaps
    cm, gm = (summary["strategies"][s]["rounds"][-1]["metrics"] for s in ("collabedit", "global"))
    assert cm["ea"] == pytest.approx(gm["ea"]) and cm["n"] == gm["n"] == 6
    assert summary["editor"] == "malmen"


def test_malmen_two_rounds_dynamic_covariance_and_every_strategy(tiny_malmen, tmp_path):
    summary, _ = run(tmp_path, clients=2, editor="malmen", dataset="zsre", strategy="all",
                     **{"num-server-rounds": 2, "beta1": 0.5, "edits-per-client": 2})
    assert max(summary["collabedit_vs_global_rel_diff"].values()) <= 1e-8
    assert set(summary["strategies"]) == set(config.STRATEGIES)
    assert all(not s["rounds"][-1]["failed"] for s in summary["strategies"].values())
    assert "MALMEN" in server_app.format_table(summary)
