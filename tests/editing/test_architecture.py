"""Architecture guards (editing.models.check_*) and Gemma-3's post-feedforward norm.

Gemma-2/3 (and OLMo-2) RMS-normalise the MLP output before it joins the residual stream, so the
block output is not additive in the edited weight: MEMIT's z must live in the MLP-output space of
one edited layer (ROME's v*). The oracle for that z is the independent reference
(editing/reference_memit.py) with its hook on the MLP output itself.
"""

import logging

import pytest
import torch

import editing.models as models
from editing.data import EditRequest
from editing.memit import compute_z, edit, fixed_covariance
from editing.models import ArchitectureError, MemitHparams, module, wrap_model
from editing.reference_memit import reference_z
from editing.workspace import workspace_for
from tests.helpers import tiny_model, tiny_tokenizer

REQUESTS = [
    EditRequest("a", "{} plays the", "Toko Yasuda", "guitar", "piano"),
    EditRequest("b", "The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    EditRequest("c", "The capital of {} is", "France", "Berlin Rome", "Paris"),
]
HP = MemitHparams(layers=(1,), v_lr=1.0, v_num_grad_steps=15, clamp_norm_factor=10.0,
                  kl_factor=1e-4, v_weight_decay=1e-5, z_batch_size=2)
TEMPLATES = [["{}"], ["The capital. {}", "I {}"]]


def gemma(attn="sdpa", dtype=torch.float64):
    model = tiny_model("gemma3", dtype=dtype)
    model.set_attn_implementation(attn)
    lm = wrap_model(model, tiny_tokenizer("llama"), "tiny-gemma3")
    with torch.no_grad():  # a sharper head and a louder layer-1 MLP: targets become reachable
        module(lm.model, lm.spec.final_norm).weight.add_(29)
        module(lm.model, lm.spec.mlp_post.format(1)).weight.add_(9)
    return lm


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_gemma3_layout_is_measured_and_edits_one_layer():
    lm = gemma()
    assert lm.spec.mlp_post == "model.layers.{}.post_feedforward_layernorm"
    assert lm.spec.hparams.layers == (1,) and lm.checked_layers == {1}
    with pytest.raises(ArchitectureError, match=r"gemma3_text.*post_feedforward_layernorm.*one "
                                                r"layer"):
        workspace_for(lm, layers="1-2", moments={1: torch.eye(48), 2: torch.eye(48)})


def test_a_post_mlp_norm_the_layout_does_not_name_is_refused(monkeypatch):
    # mapped to the Llama layout (as FAMILIES did before the guard), Gemma-3 must be refused
    monkeypatch.setitem(models.FAMILIES, "gemma3_text", models._LLAMA)
    with pytest.raises(ArchitectureError, match=r"gemma3_text.*does not reach layer \d+'s output "
                                                r"additively"):
        wrap_model(tiny_model("gemma3"), tiny_tokenizer("llama"), "tiny-gemma3")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_additive_families_pass_the_probe(kind):
    lm = wrap_model(tiny_model(kind), tiny_tokenizer(kind), f"tiny-{kind}")
    models.check_layers(lm, range(4))
    assert lm.checked_layers == {0, 1, 2, 3} and lm.spec.mlp_post is None


def test_a_rewrite_module_that_is_not_a_plain_linear_layer_is_refused():
    model = tiny_model("llama")
    model.model.layers[2].mlp.down_proj = torch.nn.Sequential(model.model.layers[2].mlp.down_proj)
    with pytest.raises(ArchitectureError, match=r"llama: model.layers.2.mlp.down_proj is a "
                                                r"Sequential"):
        wrap_model(model, tiny_tokenizer("llama"), "tiny-llama")  # its preset edits layer 2


def test_a_head_that_is_not_lm_head_of_the_final_norm_is_refused(monkeypatch):
    model = tiny_model("llama")
    forward = type(model).forward

    def scaled(self, *a, **k):  # a logit scale, as some families apply after the head
        out = forward(self, *a, **k)
        out.logits = out.logits * 2
        return out
    monkeypatch.setattr(type(model), "forward", scaled)
    with pytest.raises(ArchitectureError, match=r"llama: the model's logits are not lm_head"):
        wrap_model(model, tiny_tokenizer("llama"), "tiny-llama")


def test_soft_capped_gemma2_is_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    tok = tiny_tokenizer("llama")
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, final_logit_softcapping=30.0)
    with pytest.raises(ArchitectureError, match="gemma2: final logit soft-capping"):
        wrap_model(Gemma2ForCausalLM(cfg).eval(), tok, "tiny-gemma2")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gemma3_z_in_mlp_output_space_equals_the_reference(attn, caplog):
    lm = gemma(attn)
    with caplog.at_level(logging.WARNING):
        fast = compute_z(lm, REQUESTS, HP, TEMPLATES)
    assert "suffix-only pass unavailable" not in caplog.text  # the fast path ran
    for i, req in enumerate(REQUESTS):
        ref = reference_z(lm, req, HP, TEMPLATES, at="model.layers.{}.mlp.down_proj")
        assert rel(fast.z_init[i], ref["z_init"]) <= 1e-12
        # Gemma's RMSNorm computes in float32 even in a float64 model: post(m0 + d) - post(m0)
        # and the reference's direct pass round differently there, hence not 1e-9
        assert rel(fast.z[i], ref["z"]) <= 1e-5, (req.case_id, rel(fast.z[i], ref["z"]))
        assert int(fast.steps[i]) == ref["steps"]
    # and it is not the block-output z: that reference optimises something else
    block = reference_z(lm, REQUESTS[0], HP, TEMPLATES)
    assert rel(fast.z_init[0], block["z_init"]) > 0.1
    # the optimisation moved every target up from where the unedited model has it
    start = HP.with_overrides(v_num_grad_steps=1)  # the reference stops before its first step
    for i, req in enumerate(REQUESTS):
        p0 = reference_z(lm, req, start, TEMPLATES, at="model.layers.{}.mlp.down_proj")["p_target"]
        assert float(fast.p_target[i]) > 1.5 * float(p0), req.case_id


def test_gemma3_edit_writes_z_into_the_mlp_output():
    """With one template and a negligible C the solve is exact: after the edit, the edited layer's
    MLP output at the subject's last token is z, and the target is as likely as z made it."""
    lm = gemma()
    one = [["{}"]]
    req = REQUESTS[:1]
    z = compute_z(lm, req, HP, one)
    d_in = lm.model.config.intermediate_size
    result = edit(lm, req, HP, fixed_covariance({1: torch.eye(d_in, dtype=torch.float64)}, 1e-9),
                  templates=one, z=z)
    seen = {}
    handle = module(lm.model, "model.layers.1.mlp.down_proj").register_forward_hook(
        lambda _m, _a, out: seen.__setitem__("m", out))
    ids = lm.tok(req[0].prompt.format(req[0].subject), return_tensors="pt").input_ids
    at = len(lm.tok("Toko Yasuda").input_ids) - 1
    from editing.update import applied
    with applied(lm, result.deltas):
        lm.model(input_ids=ids)
    handle.remove()
    assert rel(seen["m"][0, at], z.z[0]) <= 1e-6
