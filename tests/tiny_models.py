"""Tiny random-initialized causal LMs built from configs (no download), one per architecture family."""

from __future__ import annotations

import torch

VOCAB = 128


def build(arch: str, seed: int = 0):
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2)
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "mistral":
        config = MistralConfig(**common)
    elif arch == "qwen2":
        config = Qwen2Config(**common)
    elif arch == "gemma3":
        config = Gemma3TextConfig(**{**common, "num_key_value_heads": 1}, head_dim=16, sliding_window=8,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64)
    else:
        raise ValueError(arch)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


ARCHS = ("llama", "qwen2", "gemma3", "gpt2")


def calibration(n: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)
