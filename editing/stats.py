"""Second moments E[k k^T] of the edited layers' inputs over general text (MEMIT's "mom2").

All edited layers are measured in ONE forward pass per batch that stops after the last edited
layer; sums are accumulated in float64 and cached on disk, keyed by model fingerprint, layer,
text source, sample size, maximum length and the model dtype.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .models import LoadedModel, cache_dir, module

log = logging.getLogger(__name__)

WIKI_LEADS = Path("wiki_text") / "wikipedia_vital_articles_en" / "summaries_en-us.extracts.txt"


class StopForward(Exception):
    """Raised by a hook once everything needed is captured: later layers are never run."""


HUB_WIKIPEDIA = ("wikimedia/wikipedia", "20231101.en")


def _leads_file(data_dir) -> Path | None:
    data_dir = data_dir or os.environ.get("COLLABEDIT_DATA")
    path = Path(data_dir) / WIKI_LEADS if data_dir else None
    return path if path is not None and path.exists() else None


def text_source(data_dir: str | Path | None = None) -> str:
    """Which text `wiki_texts` reads, as a short stable name: the lead sections file (with its
    size, so two different copies differ) or the hub's Wikipedia. Parties whose C0 came from
    different text disagree on C, and with it on every merged update."""
    leads = _leads_file(data_dir)
    if leads is not None:
        return f"leads-{leads.stat().st_size}B"
    return "hub-" + "-".join(HUB_WIKIPEDIA).replace("/", "-")


def wiki_texts(sample_size: int, data_dir: str | Path | None = None) -> list[str]:
    """Wikipedia text: the lead sections under the data directory, else `datasets`' wikipedia."""
    data_dir = data_dir or os.environ.get("COLLABEDIT_DATA")
    if _leads_file(data_dir) is not None:
        texts = [t.strip() for t in (Path(data_dir) / WIKI_LEADS).read_text().split("\n\n")]
        texts = [t for t in texts if t]
    else:
        try:
            import datasets

            ds = datasets.load_dataset(*HUB_WIKIPEDIA, split="train", streaming=True)
            texts = [row["text"] for _, row in zip(range(sample_size), ds)]
        except Exception as err:  # no internet, no hub
            raise FileNotFoundError(
                f"no Wikipedia text: set COLLABEDIT_DATA to a data directory holding {WIKI_LEADS} "
                f"(e.g. ../shared/data), or run where the Hugging Face hub is reachable ({err})"
            ) from err
    if len(texts) < sample_size:
        log.warning("asked for %d texts, only %d available: using all", sample_size, len(texts))
    return texts[:sample_size]


def model_dtype(lm: LoadedModel) -> str:
    return str(next(lm.model.parameters()).dtype).replace("torch.", "")


def _cache_path(lm: LoadedModel, layer: int, sample_size: int, max_length: int,
                source: str) -> Path:
    name = (f"{lm.spec.rewrite.format(layer)}__{source}_n{sample_size}_len{max_length}_"
            f"{model_dtype(lm)}.safetensors")
    return cache_dir() / "stats" / lm.fingerprint / name


def missing_layers(lm: LoadedModel, layers, sample_size: int = 1000, max_length: int = 256,
                   data_dir=None) -> list[int]:
    """The layers whose second moments `second_moments` would still have to measure."""
    source = text_source(data_dir)
    return [l for l in sorted(layers)
            if not _cache_path(lm, l, sample_size, max_length, source).exists()]


def second_moments(lm: LoadedModel, layers, *, sample_size: int = 1000, max_length: int = 256,
                   batch_size: int = 16, data_dir=None, progress: bool = True
                   ) -> dict[int, torch.Tensor]:
    """E[k k^T] (float64, on CPU) of the input of each layer's rewrite module."""
    layers = sorted(layers)
    out, todo = {}, []
    source = text_source(data_dir)
    for layer in layers:
        path = _cache_path(lm, layer, sample_size, max_length, source)
        if path.exists():
            out[layer] = load_file(path)["second_moment"]
        else:
            todo.append(layer)
    if not todo:
        return out
    texts = wiki_texts(sample_size, data_dir)
    sums, count = _accumulate(lm, todo, texts, max_length, batch_size, progress)
    for layer in todo:
        out[layer] = sums[layer] / count
        path = _cache_path(lm, layer, sample_size, max_length, source)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"tokens": str(count), "texts": str(len(texts)), "model": lm.name,
                "source": source}
        save_file({"second_moment": out[layer].contiguous()}, str(path), metadata=meta)
        (path.parent / "info.json").write_text(json.dumps({"model": lm.name}, indent=1))
    return out


@torch.no_grad()
def _accumulate(lm: LoadedModel, layers, texts, max_length, batch_size, progress):
    model, tok, spec = lm.model, lm.tok, lm.spec
    sums: dict[int, torch.Tensor] = {}
    mask_holder: dict[str, torch.Tensor] = {}

    def hook_for(layer):
        def hook(_mod, args):
            x = args[0][mask_holder["mask"]].float()  # real tokens only, no padding
            # one batch's product in float32 (a float64 matmul costs ~4x on CPU), summed across
            # batches in float64 so the total does not lose precision as the sample grows
            sums[layer] = sums.get(layer, 0) + (x.T @ x).to("cpu", torch.float64)
            if layer == layers[-1]:
                raise StopForward
        return hook

    handles = [module(model, spec.rewrite.format(l)).register_forward_pre_hook(hook_for(l))
               for l in layers]
    count = 0
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="second moments",
                          disable=not progress, unit="batch"):
            batch = tok(texts[start:start + batch_size], return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length).to(lm.device)
            mask_holder["mask"] = batch["attention_mask"].bool()
            count += int(batch["attention_mask"].sum())
            try:
                model(**batch, use_cache=False)
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return sums, count
