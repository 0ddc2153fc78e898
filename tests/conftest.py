"""Test setup: 8 fake CPU devices for mesh tests (must be set before JAX initialises its backend)."""

import os

# Backend optimisation level 0 compiles 2-4x faster on CPU; results stay within the tests' tolerances.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
