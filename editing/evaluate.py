"""Edit-quality metrics exactly as MEMIT defines them (docs/ALGORITHMS.md section 6).

CounterFact-style records ("counterfact", "demo", "conflict"): ES / PS / NS compare the mean per-token
NLL of " "+target_new and " "+target_true after each prompt; magnitudes are the matching probability
differences. zsRE records: EA / PA / NA are teacher-forced token accuracies. Each metric is averaged within
a record, then across records, and reported on a 0-100 scale with the harmonic mean as "score".

Every result carries `Metrics` (sums over records and counts per metric) so partial results from several
clients add up to the exact global means.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from editing.data import EditRequest

COUNTERFACT, ZSRE = "counterfact", "zsre"
KIND_OF_SOURCE = {"counterfact": COUNTERFACT, "demo": COUNTERFACT, "conflict": COUNTERFACT, "zsre": ZSRE}
METRIC_KEYS = {
    COUNTERFACT: ("es", "ps", "ns", "es_mag", "ps_mag", "ns_mag"),
    ZSRE: ("ea", "pa", "na"),
}
SCORE_KEYS = {COUNTERFACT: ("es", "ps", "ns"), ZSRE: ("ea", "pa", "na")}
# Bump when the metric definitions change so stale pre-edit caches are not reused.
CACHE_VERSION = 1


# --------------------------------------------------------------------------- aggregation


@dataclass
class Metrics:
    """Sums over records of each per-record metric value, and how many records had that metric.

    A record without paraphrases (or neighbours) has no PS (NS), hence counts per metric.
    """

    kind: str
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add_record(self, values: dict[str, float]) -> None:
        for k in METRIC_KEYS[self.kind]:
            if k in values:
                self.sums[k] = self.sums.get(k, 0.0) + float(values[k])
                self.counts[k] = self.counts.get(k, 0) + 1

    def __add__(self, other: Metrics) -> Metrics:
        if other.kind != self.kind:
            raise ValueError(f"cannot add {self.kind} metrics to {other.kind} metrics")
        keys = self.sums.keys() | other.sums.keys()
        return Metrics(
            self.kind,
            {k: self.sums.get(k, 0.0) + other.sums.get(k, 0.0) for k in keys},
            {k: self.counts.get(k, 0) + other.counts.get(k, 0) for k in keys},
        )

    def summary(self) -> dict[str, float]:
        return summarize(self.sums, self.counts, self.kind)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "sums": dict(self.sums), "counts": dict(self.counts)}

    @classmethod
    def from_dict(cls, d: dict) -> Metrics:
        return cls(d["kind"], dict(d["sums"]), {k: int(v) for k, v in d["counts"].items()})


def summarize(sums: dict[str, float], counts: dict[str, int], kind: str) -> dict[str, float]:
    """Means on the 0-100 scale, plus "score" (harmonic mean of the three rates; NaN if one is missing)
    and "n" (records)."""
    out = {k: 100.0 * sums[k] / counts[k] for k in METRIC_KEYS[kind] if counts.get(k)}
    rates = [out.get(k) for k in SCORE_KEYS[kind]]
    out["score"] = math.nan if None in rates else float(statistics.harmonic_mean(rates))
    out["n"] = max(counts.values(), default=0)
    return out


def merge_metrics(a: dict[str, Metrics], b: dict[str, Metrics]) -> dict[str, Metrics]:
    """Add two partial results keyed by kind (e.g. from two clients)."""
    return {k: a.get(k, Metrics(k)) + b.get(k, Metrics(k)) for k in a.keys() | b.keys()}


@dataclass
class EvalResult:
    """Per-record values (in request order) and the additive `Metrics` per kind."""

    per_record: list[dict] = field(default_factory=list)
    metrics: dict[str, Metrics] = field(default_factory=dict)

    def summary(self, kind: str | None = None) -> dict[str, float]:
        if kind is None:
            if len(self.metrics) > 1:
                raise ValueError(f"result mixes {sorted(self.metrics)}; pass kind=")
            if not self.metrics:
                return {}
            kind = next(iter(self.metrics))
        return self.metrics[kind].summary()

    def merge(self, other: EvalResult) -> EvalResult:
        return EvalResult(self.per_record + other.per_record, merge_metrics(self.metrics, other.metrics))

    def to_dict(self) -> dict:
        return {"per_record": self.per_record, "metrics": {k: m.to_dict() for k, m in self.metrics.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> EvalResult:
        return cls(d["per_record"], {k: Metrics.from_dict(m) for k, m in d["metrics"].items()})


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class TargetScore:
    """Teacher-forced scores of the tokens of " "+target after a prompt."""

    logprobs: tuple[float, ...]
    correct: tuple[bool, ...]  # token is the argmax given prompt + previous target tokens

    @property
    def nll(self) -> float:
        """Mean NLL per target token (MEMIT's CounterFact score)."""
        return -sum(self.logprobs) / len(self.logprobs)


def encode_pair(tok, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Prompt ids (with BOS if the tokenizer adds one) and ids of " "+target (no special tokens)."""
    p = tok(prompt)["input_ids"]
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    if not p or not t:
        raise ValueError(f"empty tokenisation for prompt {prompt!r} / target {target!r}")
    return p, t


@torch.no_grad()
def score_targets(
    model, tok, pairs: Sequence[tuple[str, str]], *, batch_size: int = 32, progress: bool = False
) -> list[TargetScore]:
    """Score each (prompt, target) pair; one right-padded forward per batch.

    Only the hidden states whose next token is a target token go through the LM head, so the
    (batch x length x vocab) logits are never built.
    """
    unique = list(dict.fromkeys(pairs))  # shared neighbourhood prompts are scored once
    encoded = [encode_pair(tok, p, t) for p, t in unique]
    # Similar lengths in one batch waste less padding; longest first so memory trouble shows early.
    order = sorted(range(len(unique)), key=lambda i: -sum(map(len, encoded[i])))
    base, head = model.base_model, model.get_output_embeddings()
    device = model.device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    scores: list[TargetScore | None] = [None] * len(unique)

    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="evaluate", disable=not progress):
        idx = order[start : start + batch_size]
        width = max(len(p) + len(t) for p, t in (encoded[i] for i in idx))
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        rows, cols, targets = [], [], []
        for r, i in enumerate(idx):
            p, t = encoded[i]
            ids[r, : len(p) + len(t)] = torch.tensor(p + t)
            mask[r, : len(p) + len(t)] = 1
            rows += [r] * len(t)
            cols += range(len(p) - 1, len(p) + len(t) - 1)  # position predicting each target token
            targets += t
        hidden = base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        states = hidden.last_hidden_state
        h = states[torch.tensor(rows, device=states.device), torch.tensor(cols, device=states.device)]
        logits = head(h.to(head.weight.device))
        logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
        tgt = torch.tensor(targets, device=logp.device)
        lp = logp.gather(1, tgt[:, None])[:, 0].tolist()
        ok = (logp.argmax(-1) == tgt).tolist()
        k = 0
        for i in idx:
            n = len(encoded[i][1])
            scores[i] = TargetScore(tuple(lp[k : k + n]), tuple(ok[k : k + n]))
            k += n

    by_pair = dict(zip(unique, scores))
    return [by_pair[pr] for pr in pairs]


# --------------------------------------------------------------------------- per-record metrics


def metric_kind(req: EditRequest) -> str:
    try:
        return KIND_OF_SOURCE[req.source]
    except KeyError:
        raise ValueError(f"record {req.case_id}: unknown source {req.source!r}") from None


def _prompt_sets(req: EditRequest) -> dict[str, tuple[str, ...]]:
    return {
        "rewrite": (req.text,),
        "paraphrase": tuple(req.paraphrase_prompts),
        "neighborhood": tuple(req.neighborhood_prompts),
    }


def _needed_pairs(req: EditRequest) -> list[tuple[str, str]]:
    """The (prompt, target) pairs a record needs; raises if a target its metric needs is missing."""
    sets = _prompt_sets(req)
    if metric_kind(req) == COUNTERFACT:
        if not req.target_true:
            raise ValueError(f"record {req.case_id}: CounterFact metrics need target_true")
        prompts = [p for ps in sets.values() for p in ps]
        return [(p, t) for p in prompts for t in (req.target_new, req.target_true)]
    if sets["neighborhood"] and not req.neighborhood_answer:
        raise ValueError(f"record {req.case_id}: zsRE NA needs neighborhood_answer")
    pairs = [(p, req.target_new) for p in sets["rewrite"] + sets["paraphrase"]]
    return pairs + [(p, req.neighborhood_answer) for p in sets["neighborhood"]]


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def _record_values(req: EditRequest, score: dict[tuple[str, str], TargetScore]) -> dict:
    kind, sets = metric_kind(req), _prompt_sets(req)
    rec: dict = {"case_id": req.case_id, "kind": kind}
    if kind == COUNTERFACT:
        rec["nll"] = {}  # per prompt: [NLL(new), NLL(true)]
        for name, key in (("rewrite", "es"), ("paraphrase", "ps"), ("neighborhood", "ns")):
            if not sets[name]:
                continue
            nlls = [(score[p, req.target_new].nll, score[p, req.target_true].nll) for p in sets[name]]
            rec["nll"][name] = [list(x) for x in nlls]
            # (wanted, other): edit prompts should prefer the new target, neighbours keep the true one.
            pairs = [(t, n) for n, t in nlls] if key == "ns" else nlls
            rec[key] = _mean(float(a < b) for a, b in pairs)
            rec[key + "_mag"] = _mean(math.exp(-a) - math.exp(-b) for a, b in pairs)
        return rec
    targets = {"rewrite": req.target_new, "paraphrase": req.target_new, "neighborhood": req.neighborhood_answer}
    for name, key in (("rewrite", "ea"), ("paraphrase", "pa"), ("neighborhood", "na")):
        if sets[name]:
            # MEMIT pools the tokens of all prompts of a set before averaging.
            rec[key] = _mean(c for p in sets[name] for c in score[p, targets[name]].correct)
    return rec


def evaluate(
    model, tok, requests: Sequence[EditRequest], *, batch_size: int = 32, progress: bool = False
) -> EvalResult:
    """Metrics of `model` on `requests`, each scored by the metrics of its `source`."""
    needed = [_needed_pairs(r) for r in requests]  # validate everything before any forward pass
    pairs = [pr for ps in needed for pr in ps]
    scores = dict(zip(pairs, score_targets(model, tok, pairs, batch_size=batch_size, progress=progress)))
    result = EvalResult()
    for req in requests:
        rec = _record_values(req, scores)
        result.per_record.append(rec)
        result.metrics.setdefault(rec["kind"], Metrics(rec["kind"])).add_record(rec)
    return result


# --------------------------------------------------------------------------- pre-edit cache


def requests_digest(requests: Sequence[EditRequest]) -> str:
    """Hash of everything in the requests that the metrics read (`extra` is ignored)."""
    rows = [{k: v for k, v in dataclasses.asdict(r).items() if k != "extra"} for r in requests]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def evaluate_cached(
    model,
    tok,
    requests: Sequence[EditRequest],
    cache_dir: str | os.PathLike,
    model_fingerprint: str,
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> EvalResult:
    """`evaluate`, memoised in `cache_dir` by model fingerprint and request contents.

    Meant for the unedited model, whose row every table repeats. The fingerprint must identify the
    weights and the tokenizer (e.g. model id + revision + dtype).
    """
    digest = requests_digest(requests)
    key = hashlib.sha256(f"{CACHE_VERSION}\n{model_fingerprint}\n{digest}".encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"eval-{key}.json"
    if path.exists():
        return EvalResult.from_dict(json.loads(path.read_text())["result"])
    result = evaluate(model, tok, requests, batch_size=batch_size, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"fingerprint": model_fingerprint, "requests": digest, "result": result.to_dict()}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)  # atomic, so concurrent runs never read a half-written file
    return result
