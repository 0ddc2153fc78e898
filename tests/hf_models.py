"""Tiny random transformers models saved to disk: the reference every parity test compares against."""

from __future__ import annotations

import torch
import transformers


def tiny_qwen2(path, seed: int = 0, std: float = 0.1, **overrides):
    """Saves a random Qwen2ForCausalLM to `path`; returns the torch model (fp32, eval mode)."""
    kw = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=256)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw)).eval()
    with torch.no_grad():  # HF's init leaves biases at zero and norms at one: randomise everything
        for p in model.parameters():
            p.normal_(0.0, std)
    model.save_pretrained(path)
    return model
