"""A 2-layer random Llama (32 hidden) for the sampling, cache and backbone tests."""
from __future__ import annotations

import torch


def tiny_llama(vocab: int = 40, eos: int = 1, heads: int = 2, kv_heads: int = 2):
    """A seeded (0) ``LlamaForCausalLM`` in eval mode; ``heads`` > ``kv_heads`` gives
    grouped KV heads (the cache then holds fewer heads than attention uses)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=64, eos_token_id=eos, pad_token_id=0,
                      bos_token_id=2)
    return LlamaForCausalLM(cfg).eval()
