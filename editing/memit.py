"""MEMIT (Meng et al. 2023), reference-exact but batched.

Two modes:
- "sequential" (the reference): layers are edited in ascending order and each layer's keys and
  current z are read from the model as edited so far.
- "parallel" (the official CollabEdit code): every layer's keys and z come from the unedited model,
  so edits by different parties merge exactly (ALGORITHMS.md section 2).

The editor never leaves the model changed: `edit()` restores the weights it touched and returns,
per edited layer, everything a party may share or keep (`delta`, `kkt`, `rkt`, residual norms).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import EditRequest
from .models import LoadedModel, MemitHparams, module
from .stats import StopForward
from .update import LayerEdit, applied, apply_deltas, layer_update, solve_layer  # noqa: F401  (re-exported)

STARTERS = ("The", "Therefore", "Because", "I", "You")
EARLY_STOP_LOSS = 5e-2  # the reference stops a request's optimisation below this loss


# ----------------------------------------------------------------------------- prompts and tokens

def fill(template: str, text: str) -> str:
    """str.format for a single "{}", safe against other braces in the text."""
    return template.replace("{}", text, 1)


def subject_last_index(tok, template: str, subject: str) -> int:
    """Index of the subject's last token in tok(fill(template, subject)).

    Tokenising prefix + subject on its own is robust to BPE merges and to a BOS token.
    """
    prefix = template[: template.index("{}")]
    return len(tok(prefix + subject)["input_ids"]) - 1


def target_ids(tok, target: str) -> list[int]:
    # MEMIT scores " " + target; special tokens (a BOS) must not enter the target
    return tok(" " + target.lstrip(" "), add_special_tokens=False)["input_ids"]


_TEMPLATE_CACHE: dict[tuple, list[list[str]]] = {}


@torch.no_grad()
def context_templates(lm: LoadedModel, count: int = 5, tokens: int = 10, seed: int = 0
                      ) -> list[list[str]]:
    """["{}"] plus `count` short prefixes sampled from the model (top-k 5, as the reference).

    The reference samples unseeded; here the sampling is seeded so that every party (and every
    re-run) uses the same templates, which the exact merge identities rely on.
    """
    key = (lm.fingerprint, count, tokens, seed)
    if key not in _TEMPLATE_CACHE:
        prefixes = []
        devices = [lm.device] if lm.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for i in range(count):
                ids = lm.tok(STARTERS[i % len(STARTERS)], return_tensors="pt").to(lm.device)
                new = max(1, tokens - ids["input_ids"].shape[1])
                out = lm.model.generate(**ids, do_sample=True, top_k=5, max_new_tokens=new,
                                        min_new_tokens=new, pad_token_id=lm.tok.pad_token_id)
                text = lm.tok.decode(out[0], skip_special_tokens=True)
                prefixes.append(text.replace("{", " ").replace("}", " ") + ". {}")
        _TEMPLATE_CACHE[key] = [["{}"], prefixes] if prefixes else [["{}"]]
    return _TEMPLATE_CACHE[key]


def _pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # right padding: MEMIT reads positions from the start
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# ----------------------------------------------------------------------------- z optimisation

@dataclass
class _ZBatch:
    """The prompts of several requests, flattened into one padded batch."""

    ids: torch.Tensor
    mask: torch.Tensor
    lookup: torch.Tensor  # per row: subject-last position (the delta goes there)
    owner: torch.Tensor  # per row: which request
    first_row: torch.Tensor  # per request: its bare-prompt row (target_init is read there)
    kl_row: torch.Tensor  # per request: its "{} is a" row
    tgt_row: torch.Tensor  # per target token: row, position whose logits predict it, token id
    tgt_pos: torch.Tensor
    tgt_id: torch.Tensor
    tgt_scale: torch.Tensor  # per request: 1 / (target length * rewriting prompts)


def _z_batch(lm: LoadedModel, requests: list[EditRequest], templates) -> _ZBatch:
    tok = lm.tok
    flat = [t for group in templates for t in group]
    rows, lookup, owner, first_row, kl_row, scale = [], [], [], [], [], []
    tgt_row, tgt_pos, tgt_id = [], [], []
    for j, req in enumerate(requests):
        target = target_ids(tok, req.target_new)
        first_row.append(len(rows))
        for ctx in flat:
            template = fill(ctx, req.prompt)
            prompt = tok(fill(template, req.subject))["input_ids"]
            # Teacher forcing: the target's tokens but the last follow the prompt; token ids are
            # concatenated rather than decoded and re-tokenised, which could merge differently.
            row = prompt + target[:-1]
            for t, tid in enumerate(target):
                tgt_row.append(len(rows))
                tgt_pos.append(len(prompt) - 1 + t)
                tgt_id.append(tid)
            lookup.append(subject_last_index(tok, template, req.subject))
            owner.append(j)
            rows.append(row)
        kl_row.append(len(rows))
        lookup.append(subject_last_index(tok, "{} is a", req.subject))
        owner.append(j)
        rows.append(tok(fill("{} is a", req.subject))["input_ids"])
        scale.append(1.0 / (len(target) * len(flat)))
    ids, mask = _pad(rows, tok.pad_token_id, lm.device)
    t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=lm.device)  # noqa: E731
    return _ZBatch(ids, mask, t(lookup), t(owner), t(first_row), t(kl_row), t(tgt_row),
                   t(tgt_pos), t(tgt_id), t(scale, torch.float32))


@dataclass
class ZResult:
    z: torch.Tensor  # (n, d_model) target output of the last edited block at the subject
    z_init: torch.Tensor  # the same output before optimisation
    p_target: torch.Tensor  # per request: exp(-mean target NLL) at the final step
    steps: torch.Tensor  # per request: optimiser steps taken


def _losses(b: _ZBatch, target_logp, kl_logp, kl_init, delta, target_init, hp: MemitHparams):
    """Per-request MEMIT loss: target NLL + KL on "{} is a" + weight decay on delta."""
    n = delta.shape[0]
    nll = torch.zeros(n, device=delta.device).index_add(0, b.owner[b.tgt_row], -target_logp)
    nll = nll * b.tgt_scale
    # F.kl_div(init, current, log_target=True, batchmean) as the reference, per request
    kl = (kl_logp.exp() * (kl_logp - kl_init)).sum(-1)
    decay = hp.v_weight_decay * delta.norm(dim=-1) / target_init.norm(dim=-1) ** 2
    return nll + hp.kl_factor * kl + decay, nll


def _optimise(b: _ZBatch, hp: MemitHparams, target_init, forward) -> ZResult:
    """Adam on one delta per request; `forward(delta)` returns (target log-probs, KL log-probs).

    Requests are independent (each delta only reaches its own rows), so one optimiser over the
    stacked deltas follows every request's reference trajectory; a request that reaches the
    early-stop loss is frozen, as the reference's `break` would leave it.
    """
    n, d = target_init.shape
    delta = torch.zeros(n, d, device=target_init.device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_norm_factor * target_init.float().norm(dim=-1)
    done = torch.zeros(n, dtype=torch.bool, device=delta.device)
    steps = torch.zeros(n, dtype=torch.long)
    kl_init, nll = None, None
    for it in range(hp.v_num_grad_steps):
        target_logp, kl_logp = forward(delta)
        if kl_init is None:
            kl_init = kl_logp.detach().clone()
        loss, nll = _losses(b, target_logp, kl_logp, kl_init, delta, target_init.float(), hp)
        done |= loss.detach() < EARLY_STOP_LOSS
        if bool(done.all()) or it == hp.v_num_grad_steps - 1:
            break
        frozen = delta.detach()[done].clone()
        opt.zero_grad()
        loss[~done].sum().backward()
        opt.step()
        with torch.no_grad():
            delta[done] = frozen  # Adam's momentum would otherwise move finished requests
            norms = delta.norm(dim=-1)
            over = (norms > max_norm) & ~done
            delta[over] *= (max_norm[over] / norms[over]).unsqueeze(-1)
        steps += (~done).cpu().long()
    z = target_init + delta.detach().to(target_init.dtype)
    return ZResult(z=z, z_init=target_init, p_target=torch.exp(-nll.detach()).cpu(), steps=steps)


def _loss_layer(lm: LoadedModel, hp: MemitHparams) -> int:
    last = lm.model.config.num_hidden_layers - 1
    return max(hp.v_loss_layer if hp.v_loss_layer is not None else last, hp.layers[-1])


def _z_chunk(lm: LoadedModel, requests, hp: MemitHparams, templates) -> ZResult:
    """Batched z: blocks up to the z layer run once; later blocks re-run from cached inputs."""
    model, spec = lm.model, lm.spec
    b = _z_batch(lm, requests, templates)
    z_layer, loss_layer = hp.layers[-1], _loss_layer(lm, hp)
    captured: dict = {}
    calls: list = []

    def keep_output(_m, _args, out):
        captured["h"] = _block_output(out).detach()

    def keep_call(i):
        def hook(_m, args, kwargs):
            calls.append((i, args, kwargs))
        return hook

    def stop(*_):
        raise StopForward

    blocks = [module(model, spec.block.format(i)) for i in range(z_layer + 1, loss_layer + 1)]
    handles = [module(model, spec.block.format(z_layer)).register_forward_hook(keep_output)]
    handles += [blk.register_forward_pre_hook(keep_call(i), with_kwargs=True)
                for i, blk in enumerate(blocks)]
    after = (module(model, spec.block.format(loss_layer + 1)) if loss_layer + 1 <
             model.config.num_hidden_layers else module(model, spec.final_norm))
    handles.append(after.register_forward_pre_hook(stop))
    try:
        with torch.no_grad(), contextlib.suppress(StopForward):
            model(input_ids=b.ids, attention_mask=b.mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    h0 = captured["h"]
    norm, head = module(model, spec.final_norm), model.get_output_embeddings()
    target_init = h0[b.first_row, b.lookup[b.first_row]]
    rows = torch.arange(len(b.owner), device=h0.device)

    def forward(delta):
        h = h0.index_put((rows, b.lookup), h0[rows, b.lookup] + delta[b.owner].to(h0.dtype))
        for i, args, kwargs in calls:
            if args:
                h = _block_output(blocks[i](h, *args[1:], **kwargs))
            else:
                h = _block_output(blocks[i](**{**kwargs, "hidden_states": h}))
        # logits only where the loss needs them: target positions and the KL positions
        logp = F.log_softmax(head(norm(h[b.tgt_row, b.tgt_pos])).float(), dim=-1)
        kl = F.log_softmax(head(norm(h[b.kl_row, b.lookup[b.kl_row]])).float(), dim=-1)
        return logp.gather(1, b.tgt_id[:, None]).squeeze(1), kl

    with torch.enable_grad():
        return _optimise(b, hp, target_init, forward)


_Z_FIELDS = ("z", "z_init", "p_target", "steps")
Z_CACHE_VERSION = 1  # bump whenever the z optimisation changes: old cache files are then ignored


def z_key(lm: LoadedModel, request: EditRequest, hp: MemitHparams, templates) -> str:
    """What a request's z depends on: the model as it is now (base weights plus applied deltas),
    the request, the optimisation settings and the templates; not lam, not the earlier layers."""
    what = [Z_CACHE_VERSION, lm.fingerprint, lm.state, request.prompt, request.subject, request.target_new,
            hp.layers[-1], _loss_layer(lm, hp), hp.v_lr, hp.v_num_grad_steps,
            hp.clamp_norm_factor, hp.kl_factor, hp.v_weight_decay, templates]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:32]


def compute_z(lm: LoadedModel, requests, hp: MemitHparams, templates, *, progress=False,
              cache: Path | None = None) -> ZResult:
    """z for every request, optimised `z_batch_size` requests at a time. With `cache`, a request
    whose z was computed before on the same model state is read back instead: in one round every
    strategy (and the GLOBAL upper bound) needs the same z, which is most of the editing cost."""
    keys = [z_key(lm, r, hp, templates) for r in requests] if cache else []
    found = {}
    for i, k in enumerate(keys):
        if (cache / f"{k}.safetensors").exists():
            found[i] = load_file(cache / f"{k}.safetensors")
    todo = [i for i in range(len(requests)) if i not in found]
    for s in tqdm(range(0, len(todo), hp.z_batch_size), desc="z", unit="batch",
                  disable=not progress or not todo):
        idx = todo[s:s + hp.z_batch_size]
        part = _z_chunk(lm, [requests[i] for i in idx], hp, templates)
        for j, i in enumerate(idx):
            found[i] = {f: getattr(part, f)[j].detach().cpu().contiguous() for f in _Z_FIELDS}
            if cache:
                cache.mkdir(parents=True, exist_ok=True)
                # write aside, then rename: parallel workers must never read a half-written file
                tmp = cache / f".{keys[i]}.{os.getpid()}.tmp"
                save_file(found[i], str(tmp))
                os.replace(tmp, cache / f"{keys[i]}.safetensors")
    device = lm.device
    return ZResult(*(torch.stack([found[i][f] for i in range(len(requests))]).to(
        device if f in ("z", "z_init") else "cpu") for f in _Z_FIELDS))


def compute_z_reference(lm: LoadedModel, request: EditRequest, hp: MemitHparams, templates
                        ) -> ZResult:
    """The reference's method: one request at a time, the whole model every step, full logits.

    Kept as the oracle for tests and the speed benchmark of `compute_z`.
    """
    model, spec = lm.model, lm.spec
    b = _z_batch(lm, [request], templates)
    z_layer = hp.layers[-1]
    state: dict = {}

    def add_delta_hook(_m, _args, out):
        h = _block_output(out)
        if "init" not in state:
            state["init"] = h[b.first_row, b.lookup[b.first_row]].detach().clone()
        rows = torch.arange(h.shape[0], device=h.device)
        h = h.index_put((rows, b.lookup), h[rows, b.lookup] + state["delta"][b.owner].to(h.dtype))
        return (h, *out[1:]) if isinstance(out, (tuple, list)) else h

    handle = module(model, spec.block.format(z_layer)).register_forward_hook(add_delta_hook)

    def forward(delta):
        state["delta"] = delta
        logits = model(input_ids=b.ids, attention_mask=b.mask, use_cache=False).logits
        logp = F.log_softmax(logits.float(), dim=-1)
        target = logp[b.tgt_row, b.tgt_pos].gather(1, b.tgt_id[:, None]).squeeze(1)
        return target, logp[b.kl_row, b.lookup[b.kl_row]]

    try:
        with torch.no_grad():  # one pass to read target_init before any delta exists
            forward(torch.zeros(1, model.config.hidden_size, device=lm.device))
        with torch.enable_grad():
            return _optimise(b, hp, state["init"], forward)
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- keys and the solve

@torch.no_grad()
def read_keys(lm: LoadedModel, requests, layers, z_layer: int, templates, batch_size: int = 64):
    """Keys of each layer (input of its rewrite module at the subject's last token, averaged over
    context templates as the reference: mean over template groups of the mean within a group) and
    the z layer's current output at the bare prompt, from one forward pass per batch.

    Returns ({layer: (n, d_in)}, (n, d_model)).
    """
    tok, model, spec = lm.tok, lm.model, lm.spec
    flat = [t for group in templates for t in group]
    rows, lookup = [], []
    for req in requests:
        for ctx in flat:
            template = fill(ctx, req.prompt)
            rows.append(tok(fill(template, req.subject))["input_ids"])
            lookup.append(subject_last_index(tok, template, req.subject))
    keys = {layer: [] for layer in layers}
    outs: list[torch.Tensor] = []
    at: dict = {}

    def key_hook(layer):
        def hook(_m, args):
            keys[layer].append(args[0][at["rows"], at["pos"]].double())
        return hook

    def out_hook(_m, _args, out):
        outs.append(_block_output(out)[at["rows"], at["pos"]].double())
        raise StopForward

    handles = [module(model, spec.rewrite.format(l)).register_forward_pre_hook(key_hook(l))
               for l in layers]
    handles.append(module(model, spec.block.format(z_layer)).register_forward_hook(out_hook))
    try:
        for s in range(0, len(rows), batch_size):
            ids, mask = _pad(rows[s:s + batch_size], tok.pad_token_id, lm.device)
            at["rows"] = torch.arange(ids.shape[0], device=lm.device)
            at["pos"] = torch.tensor(lookup[s:s + batch_size], device=lm.device)
            with contextlib.suppress(StopForward):
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    per = len(flat)
    bounds = [0]
    for group in templates:
        bounds.append(bounds[-1] + len(group))
    result = {}
    for layer in layers:
        k = torch.cat(keys[layer]).view(len(requests), per, -1)
        groups = [k[:, a:b].mean(1) for a, b in zip(bounds[:-1], bounds[1:])]
        result[layer] = torch.stack(groups).mean(0)
    cur_z = torch.cat(outs).view(len(requests), per, -1)[:, 0]  # template 0 is the bare "{}"
    return result, cur_z


def layer_edit(lm: LoadedModel, requests, z: torch.Tensor, layer: int, hp: MemitHparams,
               cov: torch.Tensor, templates) -> LayerEdit:
    """One layer of MEMIT on the model as it is now: keys, residual share, solve."""
    keys, cur_z = read_keys(lm, requests, [layer], hp.layers[-1], templates)
    remaining = len(hp.layers) - hp.layers.index(layer)
    return layer_update(lm, layer, keys[layer], (z.to(cur_z.device).double() - cur_z) / remaining, cov)



# ----------------------------------------------------------------------------- the editor

@dataclass
class EditResult:
    mode: str
    layers: dict[int, LayerEdit]
    z: ZResult
    seconds: dict = field(default_factory=dict)

    @property
    def deltas(self) -> dict[int, torch.Tensor]:
        return {layer: e.delta for layer, e in self.layers.items()}

    @property
    def residual_norms(self) -> torch.Tensor:
        """Per request ||z - h||: what is still to be written at the z layer. The first edited
        layer is solved on the model as it was (both modes), with a 1/L share of it."""
        first = self.layers[min(self.layers)]
        return first.residual_norms * len(self.layers)

    @property
    def relative_residuals(self) -> torch.Tensor:
        """||z - h_now|| / ||z - z_init||: 1 for a request new to the model, near 0 for one it
        already carries (the overlap signal of the paper's section 4.2.1). A z that needed no
        optimisation (already known) counts as 0."""
        moved = (self.z.z - self.z.z_init).double().norm(dim=-1).cpu()
        rel = self.residual_norms / moved.clamp_min(1e-12)
        return torch.where(moved > 0, rel, torch.zeros_like(rel))


def fixed_covariance(second_moments: dict[int, torch.Tensor], lam: float) -> dict[int, torch.Tensor]:
    """C = lam * E[k k^T] per layer: MEMIT's `mom2_update_weight` regulariser."""
    return {layer: lam * m for layer, m in second_moments.items()}


def edit(lm: LoadedModel, requests: list[EditRequest], hp: MemitHparams,
         cov: dict[int, torch.Tensor], *, mode: str = "sequential", templates=None,
         progress: bool = False, z_cache: Path | None = None, z: ZResult | None = None
         ) -> EditResult:
    """Run MEMIT on `requests`; the model is left unchanged. `cov[layer]` is the full regulariser C
    (e.g. `fixed_covariance(second_moments, hp.mom2_update_weight)`). `z` hands in target vectors
    optimised elsewhere (e.g. once on the base model, then reused in later rounds); by default
    they are optimised on the model as it is now, as the reference does."""
    if mode not in ("sequential", "parallel"):
        raise ValueError(f"mode must be 'sequential' or 'parallel', got {mode!r}")
    if not requests:
        raise ValueError("no edit requests")
    missing = [layer for layer in hp.layers if layer not in cov]
    if missing:
        raise KeyError(f"no covariance for edited layers {missing}")
    templates = templates or context_templates(lm, hp.context_templates, hp.context_template_tokens)
    t0 = time.perf_counter()
    if z is None:
        z = compute_z(lm, requests, hp, templates, progress=progress, cache=z_cache)
    elif z.z.shape[0] != len(requests):
        raise ValueError(f"{z.z.shape[0]} z vectors handed in for {len(requests)} requests")
    t1 = time.perf_counter()
    layers: dict[int, LayerEdit] = {}
    if mode == "parallel":
        keys, cur_z = read_keys(lm, requests, hp.layers, hp.layers[-1], templates)
        for i, layer in enumerate(hp.layers):
            residual = (z.z.to(cur_z.device).double() - cur_z) / (len(hp.layers) - i)
            layers[layer] = layer_update(lm, layer, keys[layer], residual, cov[layer])
    else:
        with contextlib.ExitStack() as stack:
            for layer in hp.layers:
                layers[layer] = layer_edit(lm, requests, z.z, layer, hp, cov[layer], templates)
                stack.enter_context(applied(lm, {layer: layers[layer].delta}))
    return EditResult(mode=mode, layers=layers, z=z,
                      seconds={"z": t1 - t0, "layers": time.perf_counter() - t1})
