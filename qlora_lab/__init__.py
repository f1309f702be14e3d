"""QLoRA Lab: declarative LoRA/QLoRA fine-tuning experiments that measure what each choice bought you."""

import os

# OpenMP's default busy-waiting makes small CPU matmuls (token-by-token generation) up to ~25x slower whenever
# another process shares the cores (measured here: 16x576x1536 matmul 0.9 ms alone vs 24 ms with 2 spinning
# threads under load, 1.2 ms with PASSIVE). Set before torch loads its OpenMP runtime; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
