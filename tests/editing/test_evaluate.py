import math
import statistics

import pytest
import torch

import editing.evaluate as ev
from editing.data import EditRequest
from editing.evaluate import EvalResult, Metrics, TargetScore, evaluate, evaluate_cached, score_targets
from tests.helpers import tiny_model, tiny_tokenizer

STYLES = ["gpt2", "llama"]

PAIRS = [
    ("The capital of France is", "Paris"),
    ("The mother tongue of Danielle Darrieux is", "French"),
    ("Toko Yasuda plays the", "guitar"),
    ("The Eiffel Tower is in", "Rome and Berlin"),
    ("Who developed Windows?", "Microsoft"),
    ("Apple A5 was created by", "Apple"),
    ("Michael Jordan plays", "basketball"),
]


@pytest.fixture(scope="module", params=STYLES)
def lm(request):
    return tiny_model(request.param, dtype=torch.float64), tiny_tokenizer(request.param)


def full_logit_oracle(model, tok, prompt, target):
    """(mean NLL, per-token argmax hits) of " "+target, from the full logits of one unpadded row."""
    p = tok(prompt)["input_ids"]
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([p + t])).logits[0].double().log_softmax(-1)
    rows = [logp[len(p) - 1 + j] for j in range(len(t))]
    nll = -sum(r[i].item() for r, i in zip(rows, t)) / len(t)
    return nll, [r.argmax().item() == i for r, i in zip(rows, t)]


def test_tokenizer_styles():
    gpt2, llama = tiny_tokenizer("gpt2"), tiny_tokenizer("llama")
    assert gpt2("The capital")["input_ids"][0] != gpt2.bos_token_id
    assert llama("The capital")["input_ids"][0] == llama.bos_token_id
    for tok in (gpt2, llama):
        assert tok(" Paris", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id
        assert len(tok) == tiny_model("gpt2" if tok is gpt2 else "llama").config.vocab_size


def test_scores_match_full_logits(lm):
    model, tok = lm
    scores = score_targets(model, tok, PAIRS, batch_size=3)
    for (prompt, target), s in zip(PAIRS, scores):
        nll, hits = full_logit_oracle(model, tok, prompt, target)
        assert s.nll == pytest.approx(nll, abs=1e-10)
        assert list(s.correct) == hits


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("style", STYLES)
def test_padding_and_batching_do_not_change_scores(style, dtype, tol):
    model, tok = tiny_model(style, dtype=dtype), tiny_tokenizer(style)
    pairs = PAIRS + [(p + " and", t) for p, t in PAIRS]
    alone = score_targets(model, tok, pairs, batch_size=1)
    for bs in (4, 64):
        for a, b in zip(alone, score_targets(model, tok, pairs, batch_size=bs)):
            assert b.logprobs == pytest.approx(a.logprobs, abs=tol)
            assert b.correct == a.correct


# The tiny tied-embedding models repeat the current token, so a target equal to the prompt's last word
# wins: with new="is" / true="of", prompts ending in "is" favour the new target, "of" the true one.
CF_RECORDS = [
    EditRequest(
        "cf-a", "The capital of {} is", "France", "is", "of", source="counterfact",
        paraphrase_prompts=("Berlin is the capital of",),  # true wins: PS 0
        neighborhood_prompts=("The official language of", "The Eiffel Tower is"),  # NS 1/2
    ),
    EditRequest(
        "cf-b", "The Louvre is a museum of {}", "Paris", "is", "of", source="demo",  # rewrite ends "Paris"
        paraphrase_prompts=("Iron Man is", "Michael Jordan plays the capital of", "Apple is in France of"),
        neighborhood_prompts=("Berlin is in Germany of", "English is spoken in London of", "Apple A5 of"),
    ),
]


def test_counterfact_known_outcome_and_oracle(lm):
    model, tok = lm
    res = evaluate(model, tok, CF_RECORDS, batch_size=5)
    a, b = res.per_record
    # cf-b's rewrite ends in "Paris": check it against the oracle rather than the copy heuristic.
    assert (a["es"], a["ps"], a["ns"]) == (1.0, 0.0, 0.5)
    assert (b["ps"], b["ns"]) == (pytest.approx(1 / 3), 1.0)
    for req, rec in zip(CF_RECORDS, res.per_record):
        for name, prompts, key in (
            ("rewrite", [req.text], "es"),
            ("paraphrase", req.paraphrase_prompts, "ps"),
            ("neighborhood", req.neighborhood_prompts, "ns"),
        ):
            nlls = [
                (full_logit_oracle(model, tok, p, req.target_new)[0],
                 full_logit_oracle(model, tok, p, req.target_true)[0])
                for p in prompts
            ]
            assert sum(rec["nll"][name], []) == pytest.approx(sum(map(list, nlls), []), abs=1e-10)
            sign = -1 if key == "ns" else 1
            assert rec[key] == statistics.mean(float(sign * (t - n) > 0) for n, t in nlls)
            mag = statistics.mean(sign * (math.exp(-n) - math.exp(-t)) for n, t in nlls)
            assert rec[key + "_mag"] == pytest.approx(mag, abs=1e-12)
    s = res.summary()
    # Record-level averaging: PS = (0 + 1/3) / 2, not the prompt-level 1/4; NS = (1/2 + 1) / 2, not 4/5.
    assert s["ps"] == pytest.approx(100 / 6)
    assert s["ns"] == pytest.approx(75.0)
    assert s["es"] == pytest.approx(50 * (a["es"] + b["es"]))
    assert s["score"] == pytest.approx(3 / (1 / s["es"] + 1 / s["ps"] + 1 / s["ns"]))
    assert s["es_mag"] == pytest.approx(50 * (a["es_mag"] + b["es_mag"]))
    assert s["n"] == 2


def test_counterfact_aggregation_exact(monkeypatch):
    """Hand-picked probabilities through evaluate(): exact rates, magnitudes and score."""
    p = {  # (prompt, target) -> probability of the whole target
        ("r1", "new"): 0.6, ("r1", "old"): 0.2,
        ("p1", "new"): 0.5, ("p1", "old"): 0.1,
        ("n1", "new"): 0.1, ("n1", "old"): 0.4,
        ("n2", "new"): 0.3, ("n2", "old"): 0.2,
        ("r2", "new"): 0.1, ("r2", "old"): 0.3,
        ("p2", "new"): 0.4, ("p2", "old"): 0.2,
        ("p3", "new"): 0.1, ("p3", "old"): 0.2,
        ("p4", "new"): 0.2, ("p4", "old"): 0.7,
        ("n3", "new"): 0.1, ("n3", "old"): 0.5,
    }
    fake = lambda model, tok, pairs, **kw: [TargetScore((math.log(p[pr]),), (False,)) for pr in pairs]
    monkeypatch.setattr(ev, "score_targets", fake)
    reqs = [
        EditRequest("a", "{}", "r1", "new", "old", ("p1",), ("n1", "n2"), source="counterfact"),
        EditRequest("b", "{}", "r2", "new", "old", ("p2", "p3", "p4"), ("n3",), source="conflict"),
    ]
    s = evaluate(None, None, reqs).summary()
    assert s["es"] == pytest.approx(50.0)
    assert s["ps"] == pytest.approx(100 * (1 + 1 / 3) / 2)
    assert s["ns"] == pytest.approx(100 * (0.5 + 1) / 2)
    assert s["es_mag"] == pytest.approx(100 * (0.4 + -0.2) / 2)
    assert s["ps_mag"] == pytest.approx(100 * (0.4 + (0.2 - 0.1 - 0.5) / 3) / 2)
    assert s["ns_mag"] == pytest.approx(100 * ((0.3 - 0.1) / 2 + 0.4) / 2)
    assert s["score"] == pytest.approx(statistics.harmonic_mean([50.0, 200 / 3, 75.0]))


ZSRE_RECORDS = [
    EditRequest(
        "z1", "The capital of {} is", "France", "is is Paris", source="zsre",
        paraphrase_prompts=("Paris is the capital of", "France has the capital"),
        neighborhood_prompts=("Berlin is the capital of",), neighborhood_answer="of of Germany",
    ),
    EditRequest(
        "z2", "Which river flows through {}?", "Cairo", "The Nile", source="zsre",
        paraphrase_prompts=("What river is in Cairo? The",),
        neighborhood_prompts=("Who developed Windows?", "Toko Yasuda plays the"),
        neighborhood_answer="Microsoft",
    ),
]


def test_zsre_token_accuracy_matches_argmax(lm):
    model, tok = lm
    res = evaluate(model, tok, ZSRE_RECORDS, batch_size=4)
    assert res.per_record[0]["ea"] == pytest.approx(2 / 3)  # " is is Paris": copy, copy, miss
    for req, rec in zip(ZSRE_RECORDS, res.per_record):
        for prompts, target, key in (
            ([req.text], req.target_new, "ea"),
            (req.paraphrase_prompts, req.target_new, "pa"),
            (req.neighborhood_prompts, req.neighborhood_answer, "na"),
        ):
            hits = [h for p in prompts for h in full_logit_oracle(model, tok, p, target)[1]]
            assert rec[key] == pytest.approx(sum(hits) / len(hits))  # tokens pooled within a record
    s = res.summary()
    for key in ("ea", "pa", "na"):
        assert s[key] == pytest.approx(50 * (res.per_record[0][key] + res.per_record[1][key]))
    assert 0 < s["na"] < 100
    rates = [s["ea"], s["pa"], s["na"]]
    assert s["score"] == pytest.approx(statistics.harmonic_mean(rates))


def test_halves_merge_to_whole(lm):
    model, tok = lm
    reqs = CF_RECORDS + ZSRE_RECORDS
    whole = evaluate(model, tok, reqs)
    halves = [evaluate(model, tok, reqs[i::2]) for i in (0, 1)]
    merged = EvalResult.from_dict(halves[0].to_dict()).merge(halves[1])  # also round-trips the wire form
    for kind in ("counterfact", "zsre"):
        m, w = merged.metrics[kind], whole.metrics[kind]
        assert m.counts == w.counts
        assert m.sums == pytest.approx(w.sums, abs=1e-12)
        assert ev.summarize(m.sums, m.counts, kind) == pytest.approx(whole.summary(kind))
    with pytest.raises(ValueError, match="kind"):
        whole.summary()
    assert sorted(r["case_id"] for r in merged.per_record) == sorted(r.case_id for r in reqs)
    assert Metrics.from_dict(w.to_dict()) + Metrics("zsre") == w


@pytest.mark.parametrize(
    "req,match",
    [
        (EditRequest("cf-77", "{} is", "X", "A", None, source="counterfact"), "cf-77.*target_true"),
        (EditRequest("z-9", "{}?", "X", "A", neighborhood_prompts=("q?",), source="zsre"), "z-9.*neighborhood_answer"),
        (EditRequest("w-1", "{}?", "X", "A", "B", source="wiki"), "w-1"),
    ],
)
def test_missing_fields_name_the_record(req, match):
    model, tok = tiny_model("gpt2"), tiny_tokenizer("gpt2")
    with pytest.raises(ValueError, match=match):
        evaluate(model, tok, CF_RECORDS + [req])


def test_evaluate_cached(tmp_path, monkeypatch):
    model, tok = tiny_model("gpt2"), tiny_tokenizer("gpt2")
    first = evaluate_cached(model, tok, CF_RECORDS, tmp_path, "tiny-gpt2@seed0")
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: pytest.fail("cache miss"))
    again = evaluate_cached(model, tok, CF_RECORDS, tmp_path, "tiny-gpt2@seed0")
    assert again.to_dict() == first.to_dict()
    assert len(list(tmp_path.glob("*.json"))) == 1
    monkeypatch.undo()
    evaluate_cached(model, tok, CF_RECORDS, tmp_path, "tiny-gpt2@seed1")  # another model: new entry
    evaluate_cached(model, tok, CF_RECORDS[:1], tmp_path, "tiny-gpt2@seed0")  # other requests too
    assert len(list(tmp_path.glob("*.json"))) == 3
