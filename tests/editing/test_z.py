"""The fast z optimisation and the key averaging against the independent reference
(editing/reference_memit.py, the original MEMIT one request at a time, sharing no helper).

The tiny random models get a final norm scaled by 30 so that their head is sharp enough for the
optimisation to reach a target, and for one request (prompt ending at the subject, one-token
target) to reach the early-stop loss while the others run every step.
"""

import logging

import pytest
import torch

import editing.memit as memit
from editing.data import EditRequest
from editing.memit import compute_z, read_keys
from editing.models import MemitHparams, module, wrap_model
from editing.reference_memit import reference_keys, reference_z
from tests.helpers import tiny_model, tiny_tokenizer

KINDS = ["gpt2", "llama"]
REQUESTS = [
    EditRequest("start", "{} plays the", "Toko Yasuda", "guitar", "piano"),
    EditRequest("middle", "The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    EditRequest("end", "The twin city of {}", "Lyon", "Paris", "Beirut"),  # reaches early stop
    EditRequest("multi", "The capital of {} is", "France", "Berlin Rome", "Paris"),
    EditRequest("inside", "What is the twin city of {}? It is", "Lyon", "Beirut", "Paris"),
]
EARLY = 2  # index of the request that stops early
HP = MemitHparams(layers=(1, 2), v_lr=1.0, v_num_grad_steps=20, clamp_norm_factor=10.0,
                  kl_factor=1e-4, v_weight_decay=1e-5, z_batch_size=3)
# groups of different sizes: a flat mean over the four and the mean of group means differ
TEMPLATES = [["{}"], ["The capital. {}", "Because French. {}", "I {}"]]


def sharp_lm(kind, dtype=torch.float64, attn=None):
    model = tiny_model(kind, dtype=dtype)
    if attn:
        model.set_attn_implementation(attn)
    lm = wrap_model(model, tiny_tokenizer(kind), f"tiny-{kind}")
    with torch.no_grad():
        module(lm.model, lm.spec.final_norm).weight.mul_(30)
    return lm


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def positions_through_block(lm, layer):
    """(rows, positions, suffix pass?) of every call of block `layer` until the handle is removed."""
    seen = []

    def record(_m, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        suffix = any(isinstance(v, memit._PrefixCache) for v in (*args, *kwargs.values()))
        seen.append((h.shape[0], h.shape[1], suffix))
    blk = module(lm.model, lm.spec.block.format(layer))
    return seen, blk.register_forward_pre_hook(record, with_kwargs=True)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", KINDS)
def test_fast_z_equals_the_independent_reference(kind, attn, caplog):
    lm = sharp_lm(kind, attn=attn)
    seen, handle = positions_through_block(lm, 3)
    with caplog.at_level(logging.WARNING):
        fast = compute_z(lm, REQUESTS, HP, TEMPLATES)
    handle.remove()
    assert "suffix-only pass unavailable" not in caplog.text
    # whole rows run once per chunk (in parts of like length); the optimisation steps see only
    # the suffixes: far fewer positions than the same steps over the whole rows
    whole = [r * w for r, w, suffix in seen if not suffix]
    stepped = sum(r * w for r, w, suffix in seen if suffix)
    assert 2 <= len(whole) <= 8  # one first pass per chunk of three requests, in <= 4 parts
    assert stepped < 0.5 * sum(whole) * HP.v_num_grad_steps
    # sdpa runs float64 throughout; Llama's eager attention takes its softmax in float32 even
    # for a float64 model, so fewer keys (the cached prefix) round differently there
    tol = 1e-9 if attn == "sdpa" or kind == "gpt2" else 1e-6
    for i, req in enumerate(REQUESTS):
        ref = reference_z(lm, req, HP, TEMPLATES)
        assert rel(fast.z[i], ref["z"]) <= tol, (req.case_id, rel(fast.z[i], ref["z"]))
        # z_init, too, passes through that float32 softmax (at a different padded width)
        assert rel(fast.z_init[i], ref["z_init"]) <= (1e-12 if tol == 1e-9 else 1e-6)
        assert int(fast.steps[i]) == ref["steps"], req.case_id
        assert abs(float(fast.p_target[i]) - float(ref["p_target"])) <= tol
    assert fast.steps[EARLY] < HP.v_num_grad_steps - 1  # stopped early, left the batch
    assert (fast.steps == HP.v_num_grad_steps - 1).sum() >= 3  # the others ran every step
    assert fast.p_target[EARLY] > 0.95


@pytest.mark.parametrize("kind", KINDS)
def test_fast_z_float32_within_1e4_of_the_reference(kind):
    lm = sharp_lm(kind, dtype=torch.float32)
    fast = compute_z(lm, REQUESTS, HP, TEMPLATES)
    assert fast.z.dtype == torch.float32
    for i, req in enumerate(REQUESTS):
        ref = reference_z(lm, req, HP, TEMPLATES)
        assert rel(fast.z[i], ref["z"]) <= 1e-4, (req.case_id, rel(fast.z[i], ref["z"]))
        assert abs(float(fast.p_target[i]) - float(ref["p_target"])) <= 1e-4


def test_whole_row_fallback_equals_the_reference(monkeypatch, caplog):
    """Where a model's blocks cannot be cut to the suffix, every step runs whole rows: slower,
    same z (and the log says so)."""
    def refuse(*_a, **_k):
        raise memit._Unsupported("refused by the test")
    monkeypatch.setattr(memit, "_SuffixPass", refuse)
    lm = sharp_lm("llama")
    with caplog.at_level(logging.WARNING):
        fast = compute_z(lm, REQUESTS[:3], HP, TEMPLATES)
    assert "refused by the test" in caplog.text
    for i, req in enumerate(REQUESTS[:3]):
        assert rel(fast.z[i], reference_z(lm, req, HP, TEMPLATES)["z"]) <= 1e-9


def test_z_stays_float32_for_a_bfloat16_model():
    lm = sharp_lm("llama", dtype=torch.bfloat16)
    fast = compute_z(lm, REQUESTS[:2], HP.with_overrides(v_num_grad_steps=3), TEMPLATES)
    assert fast.z.dtype == torch.float32 and fast.z_init.dtype == torch.float32
    # z - z_init is the optimised delta itself, not a bf16 rounding of it
    assert ((fast.z - fast.z_init) != 0).any()


@pytest.mark.parametrize("kind", KINDS)
def test_keys_average_each_template_group_then_the_groups(kind):
    lm = sharp_lm(kind)
    keys, _ = read_keys(lm, REQUESTS, [1, 2], 2, TEMPLATES)
    for layer in (1, 2):
        for j, req in enumerate(REQUESTS):
            ref = reference_keys(lm, req, layer, TEMPLATES, lm.spec.rewrite)
            assert rel(keys[layer][j], ref) <= 1e-10, (layer, req.case_id)
    # the test can tell the two means apart: a flat mean over all four templates is far off
    flat = reference_keys(lm, REQUESTS[0], 1, [[t for g in TEMPLATES for t in g]], lm.spec.rewrite)
    assert rel(flat, reference_keys(lm, REQUESTS[0], 1, TEMPLATES, lm.spec.rewrite)) > 1e-3


def test_cached_z_is_the_computed_z(tmp_path):
    lm = sharp_lm("gpt2")
    first = compute_z(lm, REQUESTS, HP, TEMPLATES, cache=tmp_path)
    again = compute_z(lm, REQUESTS, HP, TEMPLATES, cache=tmp_path)
    assert torch.equal(first.z, again.z) and torch.equal(first.steps, again.steps)


def test_z_is_bitwise_reproducible_on_the_cpu():
    lm = sharp_lm("llama", dtype=torch.float32)
    first = compute_z(lm, REQUESTS, HP, TEMPLATES)
    again = compute_z(lm, REQUESTS, HP, TEMPLATES)
    assert torch.equal(first.z, again.z) and torch.equal(first.p_target, again.p_target)
