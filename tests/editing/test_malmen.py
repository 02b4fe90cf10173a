"""MALMEN on tiny random GPT-2 (Conv1D, no BOS) and Llama (Linear, BOS) models, in float64."""

import dataclasses
import json

import pytest
import torch

from editing import malmen
from editing.data import DataError, EditRequest
from editing.evaluate import encode_pair
from editing.models import module, weight, wrap_model
from editing.train_malmen import Validator, split_records, train, training_records
from strategies.merge import collabedit
from tests.helpers import tiny_model, tiny_tokenizer

KINDS = ["gpt2", "llama"]


def zsre(i, prompt, subject, answer, rephrase, loc, loc_ans):
    return EditRequest(str(i), prompt, subject, answer, None, (rephrase,), (loc,), loc_ans,
                       source="zsre")


REQUESTS = [
    zsre(0, "What is the mother tongue of {}?", "Danielle Darrieux", "English",
         "Which language does Danielle Darrieux speak?", "The capital of France is", "Paris"),
    zsre(1, "Which instrument does {} play?", "Toko Yasuda", "guitar",
         "What does Toko Yasuda play?", "Michael Jordan plays", "basketball"),
    zsre(2, "What is the twin city of {}?", "Lyon", "Beirut Rome",
         "Lyon is twinned with which city?", "The Louvre is a museum in", "Paris"),
    zsre(3, "Who developed {}?", "Windows", "Google",
         "Which company created Windows?", "Lionel Messi plays", "soccer"),
    zsre(4, "Which river flows through {}?", "Cairo", "Nile",
         "Cairo lies on which river?", "The Eiffel Tower is in", "Paris"),
    zsre(5, "Where is {} located?", "Autonomous University of Madrid", "Spain",
         "In which country is the Autonomous University of Madrid?", "Berlin is the capital of", "Germany"),
]
HP = malmen.MalmenHparams(layers=(1, 2), rank=8, lr=1e-2, meta_lr=3e-2, edits_per_step=3, steps=8,
                          val_every=4, val_size=3, patience=10, batch_size=4)


def lm_for(kind, seed=0):
    return wrap_model(tiny_model(kind, seed=seed), tiny_tokenizer(kind), f"tiny-{kind}")


def trained_like_net(lm, seed=0):
    """A network with non-trivial weights (B != 0, lr, lam moved) and a frozen normaliser fed real
    keys and gradients: the identity network at initialisation would hide mistakes."""
    net = malmen.new_net(lm, HP)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    keys, grads = malmen.keys_and_grads(lm, REQUESTS, HP.layers)
    for l in HP.layers:
        net.normalizer.update(torch.cat((keys[l], grads[l]), -1))
    net.normalizer.frozen.fill_(True)
    return net


@pytest.mark.parametrize("kind", KINDS)
def test_update_equals_closed_form(kind):
    lm = lm_for(kind)
    net = trained_like_net(lm)
    result = malmen.edit(lm, REQUESTS, net)
    keys, grads = malmen.keys_and_grads(lm, REQUESTS, HP.layers)
    for i, l in enumerate(HP.layers):
        k, g = keys[l].double(), grads[l].double()  # n_tokens x d_in, n_tokens x d_out
        h = net.normalizer(torch.cat((k, g), -1))
        for block in net.blocks:
            x = (h @ block.A @ block.B + block.bias).clamp_min(0)
            h = h + block.scale[i] * x + block.shift[i]
        pk, pg = h[:, :k.shape[1]], h[:, k.shape[1]:]
        d = (-net.lr[i] * (k * pk).sum(-1))[:, None] * pg
        c = torch.exp(net.lam[i]) * torch.eye(k.shape[1], dtype=torch.float64)
        expected = d.T @ k @ torch.linalg.inv(c + k.T @ k)
        e = result.layers[l]
        assert e.delta.shape == weight(lm.model, lm.spec, l).shape
        assert torch.allclose(e.delta, expected.detach(), rtol=1e-9, atol=1e-12), l
        assert torch.allclose(e.kkt, k.T @ k) and torch.allclose(e.rkt, (d.T @ k).detach())
        assert e.delta.abs().max() > 0
    # the editor leaves the model as it found it
    assert lm.state == ""


@pytest.mark.parametrize("kind", KINDS)
def test_training_solve_equals_the_editor(kind):
    """Meta-training's push-through solve (n x n) gives the editor's Delta (d_in x d_in solve)."""
    lm = lm_for(kind)
    net = trained_like_net(lm)
    keys, grads = malmen.keys_and_grads(lm, REQUESTS, HP.layers)
    trained = malmen.predict_deltas(lm, net, keys, grads, grad=False)
    edited = malmen.edit(lm, REQUESTS, net)
    for l in HP.layers:
        assert torch.allclose(trained[l], edited.layers[l].delta, rtol=1e-9, atol=1e-12), l


@pytest.mark.parametrize("kind", KINDS)
def test_keys_and_grads_land_at_answer_tokens(kind):
    lm = lm_for(kind)
    tok, layer = lm.tok, 2
    keys, grads = malmen.keys_and_grads(lm, REQUESTS, [layer], batch_size=4)
    row = 0
    for req in REQUESTS:
        p, a = encode_pair(tok, req.text, req.target_new)
        if kind == "llama":
            assert p[0] == tok.bos_token_id  # the BOS is part of the prompt
        else:
            assert tok.bos_token_id not in p
        assert tok.decode(a).strip() == req.target_new
        ids = torch.tensor([p + a[:-1]])
        seen = {}
        out_leaf = {}

        def hook(_m, args, out):
            seen["in"] = args[0][0]
            leaf = torch.zeros_like(out, requires_grad=True)
            out_leaf["x"] = leaf
            return out + leaf

        h = module(lm.model, lm.spec.rewrite.format(layer)).register_forward_hook(hook)
        try:
            with torch.enable_grad():
                logits = lm.model(input_ids=ids).logits[0]  # full logits: an independent path
                positions = torch.arange(len(p) - 1, len(p) - 1 + len(a))
                nll = -logits.log_softmax(-1)[positions, torch.tensor(a)]
                (g,) = torch.autograd.grad(nll.mean(), out_leaf["x"])
        finally:
            h.remove()
        n = len(a)
        # keys: the module's input at the last prompt token and every answer token but the last
        assert torch.allclose(keys[layer][row:row + n], seen["in"][positions].detach(), atol=1e-12)
        assert torch.allclose(grads[layer][row:row + n], g[0, positions], atol=1e-12)
        row += n
    assert row == keys[layer].shape[0] == grads[layer].shape[0]


@pytest.mark.parametrize("kind", KINDS)
def test_one_round_collabedit_equals_global(kind):
    lm = lm_for(kind)
    net = trained_like_net(lm)
    cov = malmen.default_covariance(net)
    central = malmen.edit(lm, REQUESTS, net, cov)
    parts = [REQUESTS[:2], REQUESTS[2:3], REQUESTS[3:]]
    clients = [malmen.edit(lm, part, net, cov) for part in parts]
    for l in HP.layers:
        merged = collabedit([c.layers[l].kkt.numpy() for c in clients], cov[l].numpy(),
                            rkts=[c.layers[l].rkt.numpy() for c in clients])
        g = central.layers[l].delta.numpy()
        rel = ((merged - g) ** 2).sum() ** 0.5 / ((g ** 2).sum() ** 0.5)
        assert rel < 1e-8, (l, rel)
        # and it is not trivially so: the parties' own deltas do not add up to GLOBAL
        summed = sum(c.layers[l].delta.numpy() for c in clients)
        assert ((summed - g) ** 2).sum() ** 0.5 / ((g ** 2).sum() ** 0.5) > 1e-3


def records(n=24):
    """Tiny-model training tuples: every combination of the request texts with other answers."""
    answers = ["English", "guitar", "Beirut", "Google", "Nile", "Spain", "French", "Paris"]
    out = []
    for i in range(n):
        base = REQUESTS[i % len(REQUESTS)]
        out.append(zsre(i, base.prompt, base.subject, answers[(i * 3 + 1) % len(answers)],
                        base.paraphrase_prompts[0], base.neighborhood_prompts[0], base.neighborhood_answer))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_meta_training_lowers_validation_meta_loss(kind):
    lm = lm_for(kind)
    data = records()
    _, val = split_records(data, HP.val_size, HP.seed)
    net, record = train(lm, HP, data, progress=False, estimate=False)
    before = record["history"][0]  # step 0: the initial network, normaliser warmed up
    after = Validator(lm, val, HP)(net)  # the network train() returns: its best
    assert record["stopped"] == "all steps done" and record["step"] == HP.steps
    assert [h["step"] for h in record["history"]] == [0, 4, 8]
    assert bool(net.normalizer.frozen)
    assert after["meta"] == pytest.approx(record["best"], rel=1e-9)
    # the gradient reached the hypernetwork itself, not only lr and lam: B starts at zero
    assert all(block.B.abs().max() > 0 for block in net.blocks)
    assert after["meta"] < before["meta"] - 0.02, (before, after)


def test_malformed_training_record_is_named(tmp_path):
    good = {"subject": "Lyon", "src": "What is the twin city of Lyon?", "rephrase": "Lyon's twin?",
            "answers": ["Beirut"], "alt": "Rome", "loc": "nq question: who plays", "loc_ans": "Messi",
            "pred": "x", "cond": "x"}
    bad = {**good, "subject": "Paris"}  # subject not in its question
    f = tmp_path / "train.json"
    f.write_text(json.dumps([good, good, bad]))
    with pytest.raises(DataError, match="record 2"):
        training_records(f)
    f.write_text(json.dumps([good, {k: v for k, v in good.items() if k != "loc"}]))
    with pytest.raises(DataError, match="record 1"):
        training_records(f)
    f.write_text(json.dumps([good, good]))
    assert len(training_records(f)) == 2


def test_edit_refuses_an_unfrozen_normaliser():
    lm = lm_for("gpt2")
    with pytest.raises(ValueError, match="not frozen"):
        malmen.edit(lm, REQUESTS, malmen.new_net(lm, HP))


def test_interrupted_training_resumes_to_the_same_network(tmp_path):
    lm = lm_for("gpt2")
    data = records()
    straight, _ = train(lm, HP, data, progress=False, estimate=False)
    ckpt = tmp_path / "run.ckpt"
    half = dataclasses.replace(HP, steps=4)  # stands in for a run killed after its step-4 checkpoint
    train(lm, half, data, checkpoint=ckpt, progress=False, estimate=False)
    resumed, record = train(lm, HP, data, checkpoint=ckpt, progress=False, estimate=False)
    assert [h["step"] for h in record["history"]] == [0, 4, 8]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
