"""Model definitions (Flax NNX) mirroring transformers' Qwen2 / Qwen2.5(-VL)."""
