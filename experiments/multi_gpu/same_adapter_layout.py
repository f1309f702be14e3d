"""Compare two PEFT adapter folders: the same tensor names, shapes and dtypes, and trained (non-zero) B
matrices.

    python3 experiments/multi_gpu/same_adapter_layout.py ONE_GPU/adapter FSDP/adapter

Prints one JSON line; exits 1 when the layouts differ.
"""

import json
import sys
from pathlib import Path

from safetensors.torch import load_file

a, b = (load_file(Path(p) / "adapter_model.safetensors") for p in sys.argv[1:3])
layout = lambda d: {k: (tuple(v.shape), str(v.dtype)) for k, v in d.items()}  # noqa: E731
same = layout(a) == layout(b)
trained = all(float(v.float().abs().sum()) > 0 for k, v in b.items() if "lora_B" in k)
print(
    json.dumps(
        {"check": "adapter layout", "tensors": len(b), "same_layout": same, "b_matrices_trained": trained}
    )
)
sys.exit(0 if same and trained else 1)
