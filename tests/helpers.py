"""Tiny offline tokenizers and random models for fast tests (no model hub).

`tiny_tokenizer("gpt2")` is byte-level BPE without BOS (like GPT-2); `tiny_tokenizer("llama")` is a
SentencePiece-style (Metaspace) BPE that prepends "<s>" (like Llama). `tiny_model(kind)` builds a random
model whose vocabulary matches the tokenizer of the same style.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "The mother tongue of Danielle Darrieux is French.",
    "The official language of France is French. The capital of France is Paris.",
    "Toko Yasuda plays the guitar. Autonomous University of Madrid is located in Spain.",
    "What is the twin city of Lyon? It is Beirut. Apple A5 was created by Apple.",
    "The Eiffel Tower is in Paris. The Colosseum is in Rome. Berlin is the capital of Germany.",
    "Michael Jordan plays basketball. Lionel Messi plays soccer. English is spoken in London.",
    "Which river flows through Cairo? The Nile. Who developed Windows? Microsoft and Google.",
    "Iron Man is a superhero film. The Louvre is a museum in Paris, the capital of France.",
]


@lru_cache(maxsize=None)
def _tokenizer_json(style: str) -> str:
    if style == "gpt2":
        special = ["<|endoftext|>"]
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=320, special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tk.train_from_iterator(CORPUS * 4, trainer)
    elif style == "llama":
        special = ["<unk>", "<s>", "</s>"]
        tk = Tokenizer(models.BPE(unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=special, show_progress=False)
        tk.train_from_iterator(CORPUS * 4, trainer)
        bos = tk.token_to_id("<s>")
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    else:
        raise ValueError(f"unknown tokenizer style {style!r}")
    return tk.to_str()


def tiny_tokenizer(style: str = "gpt2") -> PreTrainedTokenizerFast:
    """A small trained BPE tokenizer: "gpt2" (byte-level, eos=pad, no BOS) or "llama" (adds BOS)."""
    tk = Tokenizer.from_str(_tokenizer_json(style))
    if style == "gpt2":
        return PreTrainedTokenizerFast(
            tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
            unk_token="<|endoftext|>", pad_token="<|endoftext|>",
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def tiny_model(kind: str = "gpt2", dtype: torch.dtype = torch.float64, seed: int = 0):
    """A random 4-layer causal LM (hidden 32, tied embeddings) in eval mode; vocabulary = tiny_tokenizer(kind).

    Random tied-embedding models tend to predict the current token again, which gives tests a
    predictable mix of right and wrong argmaxes (a repeated word is "known", a new word is not).
    """
    tok = tiny_tokenizer("gpt2" if kind == "gpt2" else "llama")
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(
            vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=4, n_head=4,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        )
        model = GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, tie_word_embeddings=True,  # tied, like SmolLM2
        )
        model = LlamaForCausalLM(cfg)
    elif kind == "gemma3":
        # Gemma-3's layout: the MLP output is RMS-normalised before it joins the residual
        cfg = Gemma3TextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
            sliding_window=64, query_pre_attn_scalar=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention",
                         "sliding_attention"], bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
        )
        model = Gemma3ForCausalLM(cfg)
        with torch.no_grad():  # Gemma's norms start at weight 0 (scale 1): make them differ
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(-0.5, 0.5)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    return model.to(dtype).eval()
