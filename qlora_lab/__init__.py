"""QLoRA Lab: declarative LoRA/QLoRA fine-tuning experiments that measure what each choice bought you."""

import logging
import os

# OpenMP's default busy-waiting makes small CPU matmuls (token-by-token generation) up to ~25x slower whenever
# another process shares the cores (measured here: 16x576x1536 matmul 0.9 ms alone vs 24 ms with 2 spinning
# threads under load, 1.2 ms with PASSIVE). Set before torch loads its OpenMP runtime; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# bitsandbytes, on a CPU with AVX512-BF16, tries at import to fetch a hub kernel (kernels-community, through
# the `kernels` package and the network) for its AVX512-BF16 4-bit inference layout, and warns on every start
# when it cannot. That layout is the only user of the kernel, and this project never takes it: every 4-bit
# model comes through models.load_model, which keeps each layer on the fp32 path
# (models.keep_one_cpu_4bit_path). Installing `kernels` would not help offline (it downloads the kernel at run
# time), so only that one message is dropped.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage()
)

__version__ = "0.1.0"
