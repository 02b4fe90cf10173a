"""MEMIT on tiny random GPT-2 (Conv1D, no BOS) and Llama (Linear, BOS) models, in float64."""

import pytest
import torch

from editing.data import EditRequest
from editing.memit import compute_z, edit, fill, read_keys, subject_last_index
from editing.update import SolveError, applied, solve_layer
from editing.models import MemitHparams, add_delta, module, weight, wrap_model
from tests.helpers import tiny_model, tiny_tokenizer

KINDS = ["gpt2", "llama"]
REQUESTS = [
    EditRequest("0", "The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    EditRequest("1", "{} plays the", "Toko Yasuda", "guitar", "piano"),
    EditRequest("2", "The capital of {} is", "France", "Berlin Rome", "Paris"),
    EditRequest("3", "What is the twin city of {}? It is", "Lyon", "Beirut", "Paris"),
]
HP = MemitHparams(layers=(1, 2), v_num_grad_steps=6, z_batch_size=3, context_templates=2,
                  context_template_tokens=5)
# a fixed template list keeps these tests independent of sampling
TEMPLATES = [["{}"], ["The capital. {}", "Because French. {}"]]


def lm_for(kind, seed=0):
    return wrap_model(tiny_model(kind, seed=seed), tiny_tokenizer(kind), f"tiny-{kind}")


def d_in(lm):
    return weight(lm.model, lm.spec, 1).shape[1]


def cov_for(lm, scale=0.5):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(d_in(lm), d_in(lm), generator=gen, dtype=torch.float64)
    return {layer: scale * (a @ a.T / d_in(lm) + torch.eye(d_in(lm), dtype=torch.float64))
            for layer in HP.layers}


def test_solve_layer_is_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    residual = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    c = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    cov = c @ c.T + torch.eye(12, dtype=torch.float64)
    delta, kkt, rkt = solve_layer(keys, residual, cov)
    expected = residual @ keys.T @ torch.linalg.inv(cov + keys @ keys.T)
    assert torch.allclose(delta, expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(kkt, keys @ keys.T) and torch.allclose(rkt, residual @ keys.T)


def test_solve_layer_refuses_a_singular_or_ill_conditioned_system_naming_the_layer():
    keys = torch.ones(6, 2, dtype=torch.float64)  # rank 1: K K^T alone is singular
    residual = torch.ones(3, 2, dtype=torch.float64)
    with pytest.raises(SolveError, match="layer 7.*not positive definite"):
        solve_layer(keys, residual, torch.zeros(6, 6, dtype=torch.float64), name="layer 7")
    nearly = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1e-14], dtype=torch.float64))
    with pytest.raises(SolveError, match="layer 7.*badly conditioned"):
        solve_layer(torch.zeros(6, 2, dtype=torch.float64), residual, nearly, name="layer 7")


@pytest.mark.parametrize("kind", KINDS)
def test_subject_last_index_points_at_subject_end(kind):
    tok = tiny_tokenizer(kind)
    for template, subject in [("The mother tongue of {} is", "Danielle Darrieux"),
                              ("{} plays the", "Toko Yasuda"), ("Because French. {} is a", "Lyon")]:
        ids = tok(fill(template, subject))["input_ids"]
        idx = subject_last_index(tok, template, subject)
        upto = tok.decode(ids[: idx + 1], skip_special_tokens=True)
        assert upto.rstrip().endswith(subject), (upto, subject)
        assert not tok.decode(ids[: idx], skip_special_tokens=True).rstrip().endswith(subject)
    if kind == "llama":  # the BOS token counts in the index
        assert tok("x")["input_ids"][0] == tok.bos_token_id


@pytest.mark.parametrize("kind", KINDS)
def test_keys_are_rewrite_inputs_at_subject_last_token(kind):
    lm = lm_for(kind)
    templates = [["{}"], ["The capital. {}"]]
    keys, cur_z = read_keys(lm, REQUESTS[:2], [1, 2], 2, templates)
    for j, req in enumerate(REQUESTS[:2]):
        per_template = []
        for ctx in ["{}", "The capital. {}"]:
            template = fill(ctx, req.prompt)
            ids = lm.tok(fill(template, req.subject), return_tensors="pt")["input_ids"]
            idx = subject_last_index(lm.tok, template, req.subject)
            seen = {}
            h1 = module(lm.model, lm.spec.rewrite.format(1)).register_forward_pre_hook(
                lambda m, a: seen.__setitem__("k", a[0][0, idx]))
            h2 = module(lm.model, lm.spec.block.format(2)).register_forward_hook(
                lambda m, a, o: seen.__setitem__("z", (o[0] if isinstance(o, tuple) else o)[0, idx]))
            lm.model(ids)
            h1.remove(), h2.remove()
            per_template.append(seen["k"])
            if ctx == "{}":
                assert torch.allclose(cur_z[j], seen["z"], atol=1e-12)
        # reference averaging: mean over template groups (each group here has one template)
        assert torch.allclose(keys[1][j], (per_template[0] + per_template[1]) / 2, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_weight_layout_conv1d_and_linear_edit_the_same_way(kind):
    """weight() is d_out x d_in for both layouts, and add_delta(delta) shifts the module output by
    delta @ x whether the module is GPT-2's Conv1D or a Linear."""
    lm = lm_for(kind)
    mod = module(lm.model, lm.spec.rewrite.format(1))
    w = weight(lm.model, lm.spec, 1)
    x = torch.randn(3, w.shape[1], dtype=torch.float64)
    before = mod(x)
    delta = torch.randn_like(w)
    add_delta(lm.model, lm.spec, 1, delta)
    assert torch.allclose(mod(x) - before, x @ delta.T, atol=1e-10)
    assert lm.spec.conv1d == (kind == "gpt2")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_edit_matches_closed_form_and_leaves_model_unchanged(kind, mode):
    lm = lm_for(kind)
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    cov = cov_for(lm)
    result = edit(lm, REQUESTS, HP, cov, mode=mode, templates=TEMPLATES)
    assert all(torch.equal(before[n], p) for n, p in lm.model.named_parameters())
    z = result.z.z.double()
    applied_so_far: dict = {}
    for i, layer in enumerate(HP.layers):
        # recompute K and R independently of edit(): on the model as edited so far (sequential)
        # or on the unedited model (parallel)
        with applied(lm, applied_so_far if mode == "sequential" else {}):
            keys, cur_z = read_keys(lm, REQUESTS, [layer], HP.layers[-1], TEMPLATES)
        k, r = keys[layer].T, ((z - cur_z) / (len(HP.layers) - i)).T
        expected = r @ k.T @ torch.linalg.inv(cov[layer] + k @ k.T)
        got = result.layers[layer]
        assert torch.allclose(got.delta, expected, rtol=1e-8, atol=1e-12)
        assert torch.allclose(got.kkt, k @ k.T) and torch.allclose(got.rkt, r @ k.T)
        assert torch.allclose(got.residual_norms, r.norm(dim=0))
        assert got.name == lm.spec.rewrite_weight_name(layer)
        applied_so_far[layer] = got.delta


def test_parallel_and_sequential_agree_on_first_layer_only():
    lm = lm_for("llama")
    cov = cov_for(lm)
    seq = edit(lm, REQUESTS, HP, cov, mode="sequential", templates=TEMPLATES)
    par = edit(lm, REQUESTS, HP, cov, mode="parallel", templates=TEMPLATES)
    assert torch.allclose(seq.layers[1].delta, par.layers[1].delta, atol=1e-12)
    assert (seq.layers[2].delta - par.layers[2].delta).abs().max() > 1e-9


def test_applied_restores_bit_for_bit():
    lm = lm_for("gpt2")
    w0 = weight(lm.model, lm.spec, 1).clone()
    delta = torch.full_like(w0, 1e-3 / 3)
    with applied(lm, {1: delta}):
        assert not torch.equal(weight(lm.model, lm.spec, 1), w0)
    assert torch.equal(weight(lm.model, lm.spec, 1), w0)


def test_edit_rejects_bad_input():
    lm = lm_for("gpt2")
    with pytest.raises(ValueError, match="mode"):
        edit(lm, REQUESTS, HP, cov_for(lm), mode="both", templates=TEMPLATES)
    with pytest.raises(KeyError, match="covariance"):
        edit(lm, REQUESTS, HP, {1: cov_for(lm)[1]}, templates=TEMPLATES)
    with pytest.raises(ValueError, match="no edit requests"):
        edit(lm, [], HP, cov_for(lm), templates=TEMPLATES)


def test_z_cache_reuses_per_model_state(tmp_path):
    lm = lm_for("gpt2")
    first = compute_z(lm, REQUESTS[:2], HP, TEMPLATES, cache=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    again = compute_z(lm, REQUESTS[1::-1], HP, TEMPLATES, cache=tmp_path)  # order does not matter
    assert torch.equal(again.z[0], first.z[1]) and torch.equal(again.z[1], first.z[0])
    # a changed model is a different state: nothing is reused
    with applied(lm, {2: torch.full_like(weight(lm.model, lm.spec, 2), 1e-3)}):
        assert lm.state != ""
        compute_z(lm, REQUESTS[:2], HP, TEMPLATES, cache=tmp_path)
    assert lm.state == "" and len(list(tmp_path.iterdir())) == 4


def test_zero_deltas_keep_the_model_state():
    lm = lm_for("gpt2")
    with applied(lm, {1: torch.zeros_like(weight(lm.model, lm.spec, 1))}):
        assert lm.state == ""
