"""What every party needs before editing: the model, its MEMIT settings and the second moments.

Opened once per process (a Ray worker hosts many virtual clients) and kept: loading a model and
its statistics is the expensive part, the edits themselves are cheap by comparison.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from .memit import context_templates, fixed_covariance
from .models import LoadedModel, MemitHparams, check_layers, load_model
from .stats import model_dtype, second_moments, text_source

_OPEN: dict[tuple, "Workspace"] = {}


@dataclass
class Workspace:
    lm: LoadedModel
    hp: MemitHparams
    second_moments: dict[int, torch.Tensor]  # E[k k^T] per edited layer, float64
    # sampled once from the BASE weights when the workspace opens: a process that first edits in
    # a later round must not sample them from an edited model (parties would then disagree)
    templates: list = field(default_factory=list)
    # what C0 was measured from: model, layers, text source, sample size, max length, dtype
    c0_fingerprint: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.templates:
            self.templates = context_templates(self.lm, self.hp.context_templates,
                                               self.hp.context_template_tokens)

    def agreement(self) -> dict[str, str]:
        """What every party of a merge must share for CollabEdit to equal GLOBAL: the context
        templates (their SHA-256) and C0's fingerprint (with lam), as flat strings for a Flower
        config record. Compare two with `agreement_differences`."""
        templates = json.dumps(self.templates, ensure_ascii=False)
        c0 = {**self.c0_fingerprint, "lam": float(self.hp.mom2_update_weight)}
        return {"templates-sha256": hashlib.sha256(templates.encode()).hexdigest(),
                "c0-fingerprint": json.dumps(c0, sort_keys=True)}

    def covariance(self, beta0: float = 1.0, beta1: float = 0.0, past_kkt=None
                   ) -> dict[int, torch.Tensor]:
        """C per layer: beta0 * lam * C0 + beta1 * sum of earlier rounds' K K^T (ALGORITHMS.md
        section 4); beta0=1, beta1=0 is MEMIT's fixed lam * C0."""
        cov = fixed_covariance(self.second_moments, beta0 * self.hp.mom2_update_weight)
        if past_kkt and beta1:
            cov = {layer: c + beta1 * past_kkt[layer] for layer, c in cov.items()}
        return cov


def agreement_differences(mine: dict[str, str], theirs: dict[str, str]) -> list[str]:
    """Human-readable differences between two `Workspace.agreement()`s ([] when they agree);
    a C0 fingerprint is compared field by field so the message names what differs."""
    out = []
    if mine.get("templates-sha256") != theirs.get("templates-sha256"):
        out.append(f"context templates differ (SHA-256 {mine.get('templates-sha256', '?')[:12]} "
                   f"here, {theirs.get('templates-sha256', '?')[:12]} there)")
    a, b = (json.loads(x.get("c0-fingerprint") or "{}") for x in (mine, theirs))
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"C0 fingerprint differs in {key}: {a.get(key)!r} here, {b.get(key)!r} there")
    return out


def open_workspace(model: str = "smollm2", *, dtype: str = "float32", device: str = "",
                   layers=None, mom2_update_weight: float = 0.0, v_num_grad_steps: int = 0,
                   cov_samples: int = 1000, cov_max_length: int = 256, data_dir=None,
                   hparams_file=None, progress: bool = True) -> Workspace:
    """`hparams_file`: a preset file (editing.models.read_preset) in place of the model's preset;
    `layers`, `mom2_update_weight` and `v_num_grad_steps` then override it in turn."""
    key = (model, dtype, device, str(layers), mom2_update_weight, v_num_grad_steps, cov_samples,
           cov_max_length, str(data_dir), str(hparams_file or ""))
    if key not in _OPEN:
        lm = load_model(model, device=device or None, dtype=dtype, hparams_file=hparams_file)
        _OPEN[key] = workspace_for(lm, layers=layers, mom2_update_weight=mom2_update_weight,
                                   v_num_grad_steps=v_num_grad_steps, cov_samples=cov_samples,
                                   cov_max_length=cov_max_length, data_dir=data_dir,
                                   progress=progress)
    return _OPEN[key]


def workspace_for(lm: LoadedModel, *, layers=None, mom2_update_weight=0.0, v_num_grad_steps=0,
                  cov_samples=1000, cov_max_length=256, data_dir=None, progress=True,
                  moments: dict | None = None) -> Workspace:
    """`moments` lets tests hand in second moments instead of measuring them (the fingerprint
    then says "supplied" as the text source)."""
    hp = lm.spec.hparams.with_overrides(layers=layers or None,
                                        mom2_update_weight=mom2_update_weight or None,
                                        v_num_grad_steps=v_num_grad_steps or None)
    check_layers(lm, hp.layers)  # before the statistics: a refusal should not cost minutes
    c0 = {"model": lm.fingerprint, "layers": list(hp.layers),
          "text-source": text_source(data_dir) if moments is None else "supplied",
          "sample-size": cov_samples, "max-length": cov_max_length, "dtype": model_dtype(lm)}
    if moments is None:
        moments = second_moments(lm, hp.layers, sample_size=cov_samples, max_length=cov_max_length,
                                 data_dir=data_dir, progress=progress)
    return Workspace(lm=lm, hp=hp, second_moments={l: moments[l] for l in hp.layers},
                     c0_fingerprint=c0)
