"""MALMEN (Tan et al., ICLR 2024): a trained hypernetwork turns one forward and backward pass over a
batch of requests into per-key value shifts D, and each edited layer gets the least-squares update

    Delta = D^T K (e^lam I + K^T K)^{-1}     (keys K and shifts D one row per answer token)

i.e. editing/update.py's `R K^T (C + K K^T)^{-1}` with R = D and C = e^lam I. The result is the same
`EditResult` of `LayerEdit`s as MEMIT's, so every merge strategy, the protocol and GLOBAL take it
unchanged (ALGORITHMS.md section 5).

Two deliberate departures from the reference code (ChenmienTan/malmen), both for exactness:
- the input normaliser is updated only while meta-training and frozen afterwards (the reference keeps
  updating it while editing, so the same request would map to a different shift on every call, and
  two parties would disagree);
- the edit loss is the sum over requests of each request's mean token NLL, not the mean over every
  answer token of the batch: a request's value gradients then do not depend on which other requests
  share its batch, so a party editing its own requests produces exactly the K and D rows that the
  server would produce editing everyone's (one round of CollabEdit equals GLOBAL).

Meta-training lives in `editing.train_malmen`; this module holds the network, the pass that reads keys
and value gradients, the editor, and the meta-loss both of them use.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import EditRequest
from .evaluate import encode_pair
from .memit import EditResult
from .models import LoadedModel, cache_dir, module, parse_layers, weight
from .update import LayerEdit, layer_update, solve_isotropic

# bump when the network, the keys/gradients pass or the meta-loss change: old trained nets are ignored
MALMEN_VERSION = 1


@dataclass(frozen=True)
class MalmenHparams:
    """The hypernetwork and its meta-training (reference names where they exist)."""

    layers: tuple[int, ...]
    rank: int = 1920  # low-rank blocks of the hypernetwork (reference 1920)
    n_blocks: int = 2
    lr: float = 1e-6  # initial per-layer step scale of the value shifts (learned)
    meta_lr: float = 1e-5  # Adam on the hypernetwork
    loc_coef: float = 1.0
    max_grad_norm: float = 1.0
    edits_per_step: int = 16  # requests edited together in one meta-training step
    steps: int = 300
    val_every: int = 25
    val_size: int = 64  # held-out training records for EA / PA / NA during training
    patience: int = 4  # validations without improvement before early stopping
    norm_warmup: int = 4  # steps' keys and gradients the normaliser sees before step 0
    seed: int = 0
    batch_size: int = 32  # rows per forward pass (memory only: rows never interact)

    def __post_init__(self):
        if self.rank < 1 or self.n_blocks < 0 or self.edits_per_step < 1 or self.steps < 0:
            raise ValueError(f"rank >= 1, n_blocks >= 0, edits_per_step >= 1, steps >= 0 required: {self}")

    def with_overrides(self, **kw) -> "MalmenHparams":
        kw = {k: v for k, v in kw.items() if v is not None}
        if "layers" in kw:
            kw["layers"] = tuple(parse_layers(kw["layers"]))
        return replace(self, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d


# SmolLM2's layers and rank were chosen by measurement: editing/HPARAMS.md, section MALMEN.
MALMEN_PRESETS: dict[str, MalmenHparams] = {
    "smollm2": MalmenHparams(layers=(24, 25, 26, 27, 28, 29), rank=256, lr=1e-3, meta_lr=1e-4,
                             edits_per_step=16, steps=80, val_every=20, val_size=32, patience=3,
                             norm_warmup=2),
}


def malmen_preset(lm: LoadedModel) -> MalmenHparams:
    """The model's preset, else the reference's choice scaled: the last sixth of the blocks."""
    key = lm.name.rstrip("/").split("/")[-1].lower()
    for name, hp in MALMEN_PRESETS.items():
        if key == name or key.startswith(name):
            return hp
    n = lm.model.config.num_hidden_layers
    return MalmenHparams(layers=tuple(range(n - max(1, n // 5), n)))


# ----------------------------------------------------------------------------- the hypernetwork

class FrozenableNormalizer(nn.Module):
    """Per-feature running mean / std (Chan's parallel update), as the reference's RunningMeanStd;
    `frozen` stops the updates (after training, so editing is a fixed function of the inputs)."""

    def __init__(self, size: int):
        super().__init__()
        self.register_buffer("n", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("m2", torch.zeros(size))  # sum of squared deviations
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if bool(self.frozen):
            return
        x = x.to(self.mean.dtype)
        m, n = x.shape[0], self.n
        batch_mean = x.mean(0)
        delta = batch_mean - self.mean
        total = n + m
        self.mean += delta * m / total
        self.m2 += ((x - batch_mean) ** 2).sum(0) + delta ** 2 * n * m / total
        self.n.fill_(total)

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / (self.n - 1).clamp_min(1)).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps
        return (x - self.mean.to(x.dtype)) / (self.std.to(x.dtype) + eps)


class MalmenBlock(nn.Module):
    """y + scale_l * relu(y A B + b) + shift_l: low rank, identity at initialisation (B = 0)."""

    def __init__(self, size: int, rank: int, n_layers: int):
        super().__init__()
        # the reference draws A ~ N(0, 1); scaled by 1/sqrt(size) here so that y A (y normalised)
        # has unit-size entries and the first Adam steps on B do not jump (B = 0 keeps the
        # block the identity at initialisation either way)
        self.A = nn.Parameter(torch.randn(size, rank) / math.sqrt(size))
        self.B = nn.Parameter(torch.zeros(rank, size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.scale = nn.Parameter(torch.ones(n_layers, size))
        self.shift = nn.Parameter(torch.zeros(n_layers, size))

    def forward(self, y: torch.Tensor, index: int) -> torch.Tensor:
        x = (y @ self.A @ self.B + self.bias).clamp_min(0)
        return y + self.scale[index] * x + self.shift[index]


class MalmenNet(nn.Module):
    """One network for all edited layers (they share the shape d_in -> d_out) with per-layer
    scale / shift, step scale `lr` and regulariser `lam`, as the reference does per shape."""

    def __init__(self, key_size: int, value_size: int, hp: MalmenHparams):
        super().__init__()
        self.key_size, self.value_size = key_size, value_size
        self.layers = tuple(hp.layers)
        size, n = key_size + value_size, len(hp.layers)
        self.normalizer = FrozenableNormalizer(size)
        self.blocks = nn.ModuleList(MalmenBlock(size, hp.rank, n) for _ in range(hp.n_blocks))
        self.lr = nn.Parameter(torch.full((n,), float(hp.lr)))
        self.lam = nn.Parameter(torch.zeros(n))  # C = e^lam I

    def index(self, layer: int) -> int:
        return self.layers.index(layer)

    def value_shifts(self, layer: int, keys: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """D (one row per key): -lr_l <k, k~> g~ with (k~, g~) the network's pseudo key / gradient."""
        i = self.index(layer)
        dtype = self.lr.dtype
        keys, grads = keys.to(dtype), grads.to(dtype)
        h = self.normalizer(torch.cat((keys, grads), -1))
        for block in self.blocks:
            h = block(h, i)
        pseudo_keys, pseudo_grads = h.split([self.key_size, self.value_size], -1)
        coeff = -self.lr[i] * (keys * pseudo_keys).sum(-1, keepdim=True)
        return coeff * pseudo_grads

    def covariance(self, layer: int) -> torch.Tensor:
        """C = e^lam I for one layer (float64; differentiable in lam)."""
        eye = torch.eye(self.key_size, dtype=torch.float64, device=self.lam.device)
        return self.lam[self.index(layer)].double().exp() * eye


# ----------------------------------------------------------------------------- keys and gradients

@dataclass
class TokenBatch:
    """Prompt + answer rows, teacher forced: (row, col) predicts answer token `target`."""

    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    target: torch.Tensor
    owner: torch.Tensor  # which pair each answer token belongs to
    weight: torch.Tensor  # 1 / answer length of its pair: each pair's loss is its mean token NLL


def token_batch(tok, pairs: list[tuple[str, str]], device) -> TokenBatch:
    """`pairs` of (prompt, answer), tokenised exactly as the zsRE metrics score them
    (`evaluate.encode_pair`: the prompt with the tokenizer's BOS if it adds one, " " + answer
    without special tokens), right padded."""
    encoded = [encode_pair(tok, p, a) for p, a in pairs]
    width = max(len(p) + len(a) - 1 for p, a in encoded)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    rows, cols, target, owner, wt = [], [], [], [], []
    for r, (p, a) in enumerate(encoded):
        row = p + a[:-1]  # the last answer token is predicted, never read
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
        for t, tid in enumerate(a):
            rows.append(r)
            cols.append(len(p) - 1 + t)
            target.append(tid)
            owner.append(r)
            wt.append(1.0 / len(a))
    t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    return TokenBatch(ids.to(device), mask.to(device), t(rows), t(cols), t(target), t(owner),
                      t(wt, torch.float64))


def answer_logprobs(lm: LoadedModel, b: TokenBatch) -> torch.Tensor:
    """Log-softmax at the answer positions only (never the full batch x length x vocab logits)."""
    out = lm.model.base_model(input_ids=b.ids, attention_mask=b.mask, use_cache=False)
    h = out.last_hidden_state[b.rows, b.cols]
    logits = lm.model.get_output_embeddings()(h)
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)


def edit_loss(logp: torch.Tensor, b: TokenBatch) -> torch.Tensor:
    """Sum over pairs of each pair's mean answer-token NLL."""
    nll = -logp.gather(1, b.target[:, None])[:, 0]
    return (nll.double() * b.weight).sum()


def keys_and_grads(lm: LoadedModel, requests: list[EditRequest], layers, *, batch_size: int = 32,
                   progress: bool = False) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per layer: the rewrite module's inputs at every answer token (keys, n_tokens x d_in) and the
    edit loss's gradient with respect to its output there (n_tokens x d_out), rows in request order
    then token order, from one forward and backward pass per `batch_size` requests."""
    keys = {l: [] for l in layers}
    grads = {l: [] for l in layers}
    at: dict = {}

    def hook(layer):
        def capture(_m, args, out):
            keys[layer].append(args[0][at["rows"], at["cols"]].detach())
            # a zero leaf added to the output: its gradient is the gradient w.r.t. the output,
            # while the graph below (and every other layer's gradient) stays intact
            shift = torch.zeros_like(out, requires_grad=True)
            at["shifts"][layer] = shift
            return out + shift
        return capture

    handles = [module(lm.model, lm.spec.rewrite.format(l)).register_forward_hook(hook(l)) for l in layers]
    try:
        for s in tqdm(range(0, len(requests), batch_size), desc="malmen keys", unit="batch",
                      disable=not progress):
            chunk = requests[s:s + batch_size]
            b = token_batch(lm.tok, [(r.text, r.target_new) for r in chunk], lm.device)
            at.update(rows=b.rows, cols=b.cols, shifts={})
            with torch.enable_grad():
                loss = edit_loss(answer_logprobs(lm, b), b)
                shifts = [at["shifts"][l] for l in layers]
                found = torch.autograd.grad(loss, shifts)
            for l, g in zip(layers, found):
                grads[l].append(g[b.rows, b.cols].detach())
    finally:
        for h in handles:
            h.remove()
    return ({l: torch.cat(keys[l]) for l in layers}, {l: torch.cat(grads[l]) for l in layers})


# ----------------------------------------------------------------------------- the editor

def default_covariance(net: MalmenNet) -> dict[int, torch.Tensor]:
    """C = e^lam I per layer (the covariance MALMEN was trained with)."""
    with torch.no_grad():
        return {l: net.covariance(l) for l in net.layers}


def edit(lm: LoadedModel, requests: list[EditRequest], net: MalmenNet,
         cov: dict[int, torch.Tensor] | None = None, *, batch_size: int = 32,
         progress: bool = False) -> EditResult:
    """MALMEN on `requests`; the model is left unchanged. `cov[layer]` is the regulariser C
    (default e^lam I; the run's dynamic covariance adds earlier rounds' K K^T to it). All layers'
    keys come from one pass on the model as it is now, so edits by different parties merge
    exactly. `EditResult.z` is None: MALMEN has no target vectors."""
    if not requests:
        raise ValueError("no edit requests")
    if not bool(net.normalizer.frozen):
        raise ValueError("the MALMEN normaliser is not frozen: train (or load) the network first")
    cov = cov if cov is not None else default_covariance(net)
    missing = [l for l in net.layers if l not in cov]
    if missing:
        raise KeyError(f"no covariance for edited layers {missing}")
    t0 = time.perf_counter()
    keys, grads = keys_and_grads(lm, requests, net.layers, batch_size=batch_size, progress=progress)
    t1 = time.perf_counter()
    layers: dict[int, LayerEdit] = {}
    with torch.no_grad():
        for l in net.layers:
            shifts = net.value_shifts(l, keys[l], grads[l])
            layers[l] = layer_update(lm, l, keys[l], shifts, cov[l])
    return EditResult(mode="malmen", layers=layers, z=None,
                      seconds={"keys": t1 - t0, "layers": time.perf_counter() - t1})


@dataclass
class MalmenWorkspace:
    """What a party editing with MALMEN keeps per process: the model, the hyper-parameters and the
    trained network (the counterpart of editing.workspace.Workspace for MEMIT)."""

    lm: LoadedModel
    hp: MalmenHparams
    net: MalmenNet

    def base_covariance(self) -> dict[int, torch.Tensor]:
        return default_covariance(self.net)

    def covariance(self, beta0: float = 1.0, beta1: float = 0.0, past_kkt=None
                   ) -> dict[int, torch.Tensor]:
        """C per layer: beta0 * e^lam I + beta1 * sum of earlier rounds' K K^T (the dynamic
        covariance of ALGORITHMS.md section 4 with MALMEN's regulariser in place of lam C0)."""
        cov = {l: beta0 * c for l, c in self.base_covariance().items()}
        if past_kkt and beta1:
            cov = {l: c + beta1 * past_kkt[l].to(c.dtype) for l, c in cov.items()}
        return cov

    def agreement(self) -> dict[str, str]:
        """Every party must edit with the same network (it fixes the shifts and C = e^lam I):
        its fingerprint travels where MEMIT's C0 fingerprint does."""
        h = hashlib.sha256()
        for name, t in sorted(self.net.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        what = {"editor": "malmen", "model": self.lm.fingerprint, "layers": list(self.net.layers),
                "network": h.hexdigest()[:16]}
        return {"templates-sha256": "none (MALMEN has no context templates)",
                "c0-fingerprint": json.dumps(what, sort_keys=True)}


# ----------------------------------------------------------------------------- the meta-loss

@dataclass
class MetaBatch:
    """Edit / equivalence / locality tuples of a set of requests, tokenised once."""

    requests: list[EditRequest]
    equiv: TokenBatch
    loc: TokenBatch
    loc_ref: torch.Tensor  # the unedited model's log-probs at the locality answer tokens


def training_pairs(request: EditRequest) -> tuple[tuple[str, str], tuple[str, str]]:
    """(rephrase, answer) and (locality question, its answer) of a zsRE-style request."""
    if not request.paraphrase_prompts or not request.neighborhood_prompts or not request.neighborhood_answer:
        raise ValueError(f"request {request.case_id}: meta-training needs a paraphrase prompt and a "
                         f"locality question with its answer")
    return ((request.paraphrase_prompts[0], request.target_new),
            (request.neighborhood_prompts[0], request.neighborhood_answer))


@torch.no_grad()
def meta_batch(lm: LoadedModel, requests: list[EditRequest]) -> MetaBatch:
    pairs = [training_pairs(r) for r in requests]
    equiv = token_batch(lm.tok, [p[0] for p in pairs], lm.device)
    loc = token_batch(lm.tok, [p[1] for p in pairs], lm.device)
    return MetaBatch(requests, equiv, loc, answer_logprobs(lm, loc))


def locality_kl(logp: torch.Tensor, ref: torch.Tensor, b: TokenBatch) -> torch.Tensor:
    """KL(unedited || edited) at the locality answer tokens, mean per pair, summed over pairs."""
    kl = (ref.exp() * (ref - logp)).sum(-1)
    return (kl.double() * b.weight).sum()


def meta_loss(lm: LoadedModel, mb: MetaBatch, loc_coef: float) -> tuple[torch.Tensor, dict]:
    """Edit loss on the equivalent prompts + loc_coef * locality KL, both means over requests,
    on the model as it is now (edited)."""
    n = len(mb.requests)
    gen = edit_loss(answer_logprobs(lm, mb.equiv), mb.equiv) / n
    loc = locality_kl(answer_logprobs(lm, mb.loc), mb.loc_ref, mb.loc) / n
    total = gen + loc_coef * loc
    return total, {"gen": float(gen.detach()), "loc": float(loc.detach()), "meta": float(total.detach())}


def predict_deltas(lm: LoadedModel, net: MalmenNet, keys, grads, *, grad: bool
                   ) -> dict[int, torch.Tensor]:
    """Delta per layer, differentiable in the network and lam when `grad`: the editor's update
    with C = e^lam I, solved through update.solve_isotropic (n answer tokens, not d_in, unknowns:
    the same Delta as `edit`'s `solve_layer`, at a fraction of the cost of a training step)."""
    out = {}
    with torch.set_grad_enabled(grad):
        for l in net.layers:
            shifts = net.value_shifts(l, keys[l], grads[l])
            out[l] = solve_isotropic(keys[l].T, shifts.T, net.lam[net.index(l)].double().exp(),
                                     name=f"layer {l} ({lm.spec.rewrite_weight_name(l)})")
    return out


def meta_step_grads(lm: LoadedModel, net: MalmenNet, mb: MetaBatch, keys, grads, loc_coef: float
                    ) -> dict:
    """The reference's two-stage backward: (1) the deltas go on the model as plain tensors and the
    meta-loss is backpropagated through the language model to the edited weights only, giving
    dL/dDelta; (2) dL/dDelta is backpropagated through the solve and the hypernetwork. The
    language model's graph and the hypernetwork's graph are never alive at the same time.
    Leaves the gradients in net's parameters; returns the loss parts."""
    deltas = predict_deltas(lm, net, keys, grads, grad=True)
    weights = {l: weight(lm.model, lm.spec, l) for l in net.layers}
    params = {l: module(lm.model, lm.spec.rewrite.format(l)).weight for l in net.layers}
    saved = {l: w.detach().clone() for l, w in weights.items()}
    try:
        with torch.no_grad():
            for l, w in weights.items():
                w.add_(deltas[l].detach().to(w.dtype))
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            loss, parts = meta_loss(lm, mb, loc_coef)
            found = torch.autograd.grad(loss, [params[l] for l in net.layers])
    finally:
        for p in params.values():
            p.requires_grad_(False)
        with torch.no_grad():
            for l, w in weights.items():
                w.copy_(saved[l])
    total = 0.0
    for l, g in zip(net.layers, found):
        g = g.T if lm.spec.conv1d else g  # d_out x d_in, as Delta
        total = total + (deltas[l] * g.to(deltas[l].dtype)).sum()
    total.backward()
    return parts


# ----------------------------------------------------------------------------- the trained network

def records_digest(requests: list[EditRequest]) -> str:
    rows = [[r.case_id, r.prompt, r.subject, r.target_new, list(r.paraphrase_prompts),
             list(r.neighborhood_prompts), r.neighborhood_answer] for r in requests]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def net_key(lm: LoadedModel, hp: MalmenHparams, data_digest: str) -> str:
    """What a trained network depends on: the model, the layers and every hyper-parameter, the
    training records and this code's version."""
    what = [MALMEN_VERSION, lm.fingerprint, hp.to_dict(), data_digest]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def net_dir() -> Path:
    return cache_dir() / "malmen"


def new_net(lm: LoadedModel, hp: MalmenHparams) -> MalmenNet:
    w = weight(lm.model, lm.spec, hp.layers[0])
    shapes = {tuple(weight(lm.model, lm.spec, l).shape) for l in hp.layers}
    if len(shapes) != 1:
        raise ValueError(f"edited layers {hp.layers} have different shapes {shapes}; one network "
                         f"serves layers of one shape")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(hp.seed)
    try:
        net = MalmenNet(w.shape[1], w.shape[0], hp)
    finally:
        torch.random.set_rng_state(gen_state)
    return net.to(device=w.device, dtype=w.dtype if w.dtype == torch.float64 else torch.float32)


def save_net(net: MalmenNet, hp: MalmenHparams, path: Path, meta: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{id(net)}.tmp")
    torch.save({"hparams": hp.to_dict(), "state": net.state_dict(), "meta": meta or {},
                "shape": [net.key_size, net.value_size]}, tmp)
    tmp.replace(path)


def load_net(path: Path, device=None) -> tuple[MalmenNet, MalmenHparams, dict]:
    blob = torch.load(path, map_location=device or "cpu", weights_only=True)
    hp = MalmenHparams(**{**blob["hparams"], "layers": tuple(blob["hparams"]["layers"])})
    net = MalmenNet(*blob["shape"], hp)
    dtype = blob["state"]["lr"].dtype
    net = net.to(dtype)
    net.load_state_dict(blob["state"])
    return net.to(device or "cpu"), hp, blob["meta"]


__all__ = ["MalmenHparams", "MalmenNet", "MalmenWorkspace", "MALMEN_PRESETS", "malmen_preset", "keys_and_grads",
           "edit", "default_covariance", "meta_batch", "meta_loss", "meta_step_grads",
           "predict_deltas", "net_key", "net_dir", "new_net", "save_net", "load_net",
           "records_digest", "token_batch"]
