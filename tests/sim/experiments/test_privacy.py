"""Privacy analysis: the pure scores on synthetic arrays, then the whole measurement on the tiny model."""

import csv
import dataclasses

import numpy as np
import pytest
import torch

from editing.data import EditRequest
from editing.memit import read_keys
from editing.update import solve_layer
from sim.experiments.privacy import (best_cos, delta_gain, delta_span_basis, measure, next_token_with,
                         recover_residuals, report, roc_auc, span_basis, span_fraction, tpr_at_fpr)
from tests.sim.conftest import REQUESTS


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _spd(d, gen):
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T / d + torch.eye(d, dtype=torch.float64)


def test_one_key_is_recovered_exactly_up_to_sign():
    k = torch.randn(1, 64, generator=_gen(), dtype=torch.float64)
    q = span_basis(k.T @ k)
    assert q.shape == (64, 1)
    assert abs(best_cos(q, k).item() - 1) < 1e-10
    assert abs(best_cos(q, -k).item() - 1) < 1e-10


def test_several_keys_give_the_span_but_not_the_keys():
    keys = torch.randn(4, 64, generator=_gen(1), dtype=torch.float64)
    q = span_basis(keys.T @ keys)
    assert q.shape[1] == 4  # numerical rank = number of edits
    assert torch.allclose(span_fraction(q, keys), torch.ones(4, dtype=torch.float64), atol=1e-10)
    assert best_cos(q, keys).max() < 0.999  # generic keys are not eigenvectors
    outside = torch.randn(50, 64, generator=_gen(2), dtype=torch.float64)
    assert span_fraction(q, outside).max() < 0.5


def test_delta_reveals_the_key_span_given_c_and_the_residuals_given_the_keys():
    gen = _gen(3)
    keys = torch.randn(3, 40, generator=gen, dtype=torch.float64)
    resid = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    cov = 5 * _spd(40, gen)
    delta, kkt, rkt = solve_layer(keys.T, resid.T, cov)
    q = delta_span_basis(delta, cov)
    assert q.shape[1] == 3
    assert torch.allclose(span_fraction(q, keys), torch.ones(3, dtype=torch.float64), atol=1e-9)
    assert span_fraction(q, torch.randn(20, 40, generator=gen, dtype=torch.float64)).max() < 0.6
    # without C the row space of Delta is span(C^-1 K), not span(K)
    _, _, vh = torch.linalg.svd(delta)
    assert span_fraction(vh[:3].T, keys).min() < 0.99
    assert torch.allclose(recover_residuals(rkt, keys), resid.T, atol=1e-9)
    assert torch.allclose(recover_residuals(delta @ (cov + kkt), keys), resid.T, atol=1e-8)
    # edited keys make Delta react; the naive score is larger for them on average
    assert delta_gain(delta, keys).mean() > delta_gain(delta, torch.randn(20, 40, generator=gen,
                                                                          dtype=torch.float64)).mean()


def test_roc_auc_and_tpr():
    assert roc_auc([0.9, 0.4], [0.5, 0.1]) == 0.75
    assert roc_auc([1, 1], [1, 1]) == 0.5
    assert roc_auc([2, 3], [0, 1]) == 1.0
    neg = np.arange(100) / 100  # 0.00 .. 0.99
    pos = [0.995, 0.985, 0.5]
    assert tpr_at_fpr(pos, neg, 0.005) == pytest.approx(1 / 3)  # no false positive: above 0.99
    assert tpr_at_fpr(pos, neg, 0.01) == pytest.approx(2 / 3)  # one allowed: above 0.98
    assert tpr_at_fpr(pos, neg, 0.5) == 1.0  # above 0.49
    # a low-rank S against random outside keys: perfect separation
    keys = torch.randn(5, 64, generator=_gen(4), dtype=torch.float64)
    q = span_basis(keys.T @ keys)
    outside = torch.randn(200, 64, generator=_gen(5), dtype=torch.float64)
    pos, neg = span_fraction(q, keys), span_fraction(q, outside)
    assert roc_auc(pos, neg) == 1.0 and tpr_at_fpr(pos, neg, 0.01) == 1.0


def test_installing_the_unedited_output_changes_nothing(tiny):
    # the subject ends the prompt, so what is installed there feeds the prediction directly
    lm, reqs = tiny.lm, [dataclasses.replace(r, prompt="So, {}") for r in REQUESTS]
    _, cur_z = read_keys(lm, reqs, [tiny.hp.layers[0]], tiny.hp.layers[-1], tiny.templates)
    base = next_token_with(lm, reqs, tiny.hp.layers[-1])
    assert next_token_with(lm, reqs, tiny.hp.layers[-1], cur_z) == base
    noise = 30 * torch.randn(cur_z.shape, generator=_gen(6), dtype=torch.float64)
    assert next_token_with(lm, reqs, tiny.hp.layers[-1], noise) != base


SUBJECTS = ["Berlin", "Madrid", "Apple", "Cairo", "Nile", "Lionel Messi", "London", "Spain",
            "Iron Man", "The Colosseum", "Rome", "Germany"]
OUTSIDE = [EditRequest(str(100 + i), "{} is located in", s, "Rome", "Paris", source="counterfact")
           for i, s in enumerate(SUBJECTS)]


def test_measure_and_report_on_the_tiny_model(tiny, tmp_path):
    p = {"ns": [1, 2, 4], "max_clients": 2, "readout_n": 2, "hist_n": 2, "nonmember_offset": 100}
    res = measure(tiny, REQUESTS[:4], OUTSIDE, p, z_cache=tmp_path / "z")
    rec = {r["edits-per-client"]: r for r in res["reconstruction"]}
    assert set(rec) == {1, 2, 4} and rec[4]["clients"] == 1 and rec[1]["clients"] == 2
    assert rec[1]["best-eigvec-cos-min"] == pytest.approx(1, abs=1e-9)
    assert all(r["rank-equals-n"] and r["span-frac-kkt-min"] > 1 - 1e-9 for r in rec.values())
    assert all(r["residual-relerr-rkt-max"] < 1e-6 for r in rec.values())
    exact = [r for r in res["membership"] if r["attacker"] == "exact request" and "span" in r["observed"]]
    assert exact and all(r["auc"] == 1.0 for r in exact)
    assert any(r["observed"].startswith("sum of 2") for r in res["membership"])
    ro = res["readout"]
    assert ro["requests"] == 4 and ro["recovered z"] == ro["client z"]
    md = report({"title": "tiny privacy", "scale": "tiny"}, {**p, "nonmembers": 12}, res, "tiny-llama",
                tmp_path, 1.0)
    assert md.startswith("# tiny privacy") and "auc" in md
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert len(rows) == len(res["membership"]) and {"auc", "tpr@1%fpr"} <= set(rows[0])
    for png in ("privacy.png", "membership_scores.png"):
        assert (tmp_path / png).stat().st_size > 10_000
