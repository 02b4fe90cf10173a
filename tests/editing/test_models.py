import pytest
import torch

import editing.memit as memit
from editing.memit import context_templates
from editing.models import PRESETS, parse_layers, preset_for, wrap_model
from tests.helpers import tiny_model, tiny_tokenizer


def test_paper_presets_match_algorithms_md():
    assert PRESETS["gpt2-xl"].layers == (13, 14, 15, 16, 17)
    assert PRESETS["gpt2-xl"].mom2_update_weight == 20000 and PRESETS["gpt2-xl"].v_num_grad_steps == 20
    assert PRESETS["gpt-j-6b"].layers == (3, 4, 5, 6, 7, 8)
    assert PRESETS["meta-llama-3-8b"].v_lr == 0.1
    assert preset_for("EleutherAI/gpt-j-6B", "gptj", 28) is PRESETS["gpt-j-6b"]
    assert preset_for("meta-llama/Meta-Llama-3-8B", "llama", 32) is PRESETS["meta-llama-3-8b"]


def test_parse_layers():
    assert parse_layers("4-8") == [4, 5, 6, 7, 8]
    assert parse_layers("3,5, 9-10") == [3, 5, 9, 10]
    with pytest.raises(ValueError):
        parse_layers("3,3")


@pytest.mark.parametrize("kind,family,path", [("gpt2", "gpt2", "transformer.h.{}.mlp.c_proj"),
                                              ("llama", "llama", "model.layers.{}.mlp.down_proj")])
def test_spec_found_from_config(kind, family, path):
    lm = wrap_model(tiny_model(kind), tiny_tokenizer(kind), f"tiny-{kind}")
    assert lm.spec.family == family and lm.spec.rewrite == path
    assert lm.tok.padding_side == "right" and lm.tok.pad_token is not None
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_context_templates_are_seeded():
    lm = wrap_model(tiny_model("llama"), tiny_tokenizer("llama"), "tiny-llama")
    a = context_templates(lm, 3, 6, seed=7)
    memit._TEMPLATE_CACHE.clear()
    torch.manual_seed(123)  # the global RNG state must not matter
    b = context_templates(lm, 3, 6, seed=7)
    assert a == b and a[0] == ["{}"] and len(a[1]) == 3
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in a[1])
