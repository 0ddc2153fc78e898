"""Storage formats on disk: safetensors (Hugging Face directories); merit_jax checkpoints join them later."""
