"""The original MEMIT target and key computation, one request at a time: the oracle of the tests
and the baseline of `benchmarks/bench_z.py`. The editor never calls it.

Written from the algorithm (kmeng01/memit `compute_z` and `compute_ks`, ALGORITHMS.md section 1),
deliberately sharing no helper with `editing.memit` beyond the loaded model: its own prompt
building, token positions, hooks, loss and Adam loop. What it must agree with the fast path on
is the algorithm, not the code:

- rows: every context template filled with the request's prompt and subject, then the target's
  tokens but the last appended as token ids (teacher forcing), plus one "{subject} is a" row;
- the subject's last token: `len(tok(prefix + subject)) - 1` (ALGORITHMS.md section 1: robust to
  BPE merges and to a BOS, where the original's separately tokenised lengths count a BOS twice);
- the whole model runs every step with a hook that adds delta to the last edited block's output
  at the subject's last token of every row, and full logits are computed;
- loss = mean over rewriting rows of the target's mean token NLL + kl_factor * KL(current ||
  step-0 distribution) at the KL row's subject position + v_weight_decay * ||delta|| / ||h0||^2;
  stop when the loss is below 5e-2 or at the last step (no step taken then); Adam; clamp
  ||delta|| <= clamp_norm_factor * ||h0|| after every step.
"""

from __future__ import annotations

import torch

STOP_LOSS = 5e-2


def _blocks(model):
    """The decoder blocks, found by walking the model rather than through editing.models."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ValueError(f"reference MEMIT: no decoder blocks found in {type(model).__name__}")


def _subject_last(tok, text_before_subject: str, subject: str) -> int:
    return len(tok(text_before_subject + subject).input_ids) - 1


def _request_rows(tok, prompt: str, subject: str, target: str, templates):
    """(ids, subject-last index, number of target tokens predicted) per row; the KL row last."""
    target_tokens = tok(" " + target.lstrip(" "), add_special_tokens=False).input_ids
    rows = []
    for group in templates:
        for template in group:
            cut = template.index("{}")
            sentence = template[:cut] + prompt + template[cut + 2:]
            at = sentence.index("{}")
            text = sentence[:at] + subject + sentence[at + 2:]
            ids = tok(text).input_ids
            rows.append((ids + target_tokens[:-1], _subject_last(tok, sentence[:at], subject),
                         len(ids)))
    kl_text = subject + " is a"
    rows.append((tok(kl_text).input_ids, _subject_last(tok, "", subject), None))
    return rows, target_tokens


def reference_z(lm, request, hp, templates, *, at: str | None = None) -> dict:
    """One request's z as the original MEMIT computes it. Returns z, z_init, p_target, steps.

    `at`: the path of the module whose output delta is added to, "{}" for the layer; by default
    the last edited block (MEMIT); an MLP output path gives ROME's v* there."""
    model, tok = lm.model, lm.tok
    device = next(model.parameters()).device
    rows, target_tokens = _request_rows(tok, request.prompt, request.subject, request.target_new,
                                        templates)
    width = max(len(ids) for ids, _, _ in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, _, _) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    subject_at = [at for _, at, _ in rows]
    rewriting = len(rows) - 1

    model_dtype = next(model.parameters()).dtype
    work_dtype = torch.promote_types(model_dtype, torch.float32)
    delta = torch.zeros(model.config.hidden_size, dtype=work_dtype, device=device,
                        requires_grad=True)
    state = {"init": None}

    def add_delta(_module, _inputs, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if state["init"] is None:
            state["init"] = hidden[0, subject_at[0]].detach().clone()
        for i, at in enumerate(subject_at):
            hidden[i, at] += delta.to(hidden.dtype)
        return output

    z_layer = hp.layers[-1]
    hooked = _blocks(model)[z_layer] if at is None else model.get_submodule(at.format(z_layer))
    handle = hooked.register_forward_hook(add_delta)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    kl_init, steps, nll = None, 0, None
    try:
        for it in range(hp.v_num_grad_steps):
            opt.zero_grad()
            logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
            logp = torch.log_softmax(logits.to(work_dtype), dim=-1)
            token_nll = []
            for i, (_, _, prompt_len) in enumerate(rows[:rewriting]):
                picked = [logp[i, prompt_len - 1 + t, tid] for t, tid in enumerate(target_tokens)]
                token_nll.append(-torch.stack(picked).sum() / len(target_tokens))
            nll = torch.stack(token_nll).mean()
            kl_logp = logp[rewriting, subject_at[rewriting]]
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            kl = (kl_logp.exp() * (kl_logp - kl_init)).sum()
            h0 = state["init"].to(work_dtype)
            decay = hp.v_weight_decay * delta.norm() / h0.norm() ** 2
            loss = nll + hp.kl_factor * kl + decay
            if loss.item() < STOP_LOSS or it == hp.v_num_grad_steps - 1:
                break
            loss.backward()
            opt.step()
            steps += 1
            limit = hp.clamp_norm_factor * h0.norm()
            with torch.no_grad():
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
    finally:
        handle.remove()
    z_init = state["init"].to(work_dtype)
    return {"z": (z_init + delta.detach()), "z_init": z_init,
            "p_target": torch.exp(-nll.detach()).cpu(), "steps": steps}


@torch.no_grad()
def reference_keys(lm, request, layer: int, templates, rewrite_module: str) -> torch.Tensor:
    """The key of one request at one layer, as the original `compute_ks`: the input of the layer's
    rewrite module at the subject's last token, one template at a time, averaged within each
    template group and then across the groups. `rewrite_module` is the module path with "{}" for
    the layer (e.g. "model.layers.{}.mlp.down_proj")."""
    model, tok = lm.model, lm.tok
    device = next(model.parameters()).device
    target = model.get_submodule(rewrite_module.format(layer))
    seen = {}

    def grab(_module, inputs):
        seen["x"] = inputs[0]

    handle = target.register_forward_pre_hook(grab)
    group_means = []
    try:
        for group in templates:
            keys = []
            for template in group:
                cut = template.index("{}")
                sentence = template[:cut] + request.prompt + template[cut + 2:]
                at = sentence.index("{}")
                ids = tok(sentence[:at] + request.subject + sentence[at + 2:],
                          return_tensors="pt").input_ids.to(device)
                model(input_ids=ids, use_cache=False)
                keys.append(seen["x"][0, _subject_last(tok, sentence[:at], request.subject)].double())
            group_means.append(torch.stack(keys).mean(0))
    finally:
        handle.remove()
    return torch.stack(group_means).mean(0)
