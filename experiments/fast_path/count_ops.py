"""Ops dispatched in one training step (forward, recomputation and backward; checkpointing on, the backward
reusing the recomputation's weights) of the tiny nf4 model on a CPU, with the LoRA layers fused per layer and
with grouped projections (train.group_projections). A count, not a time: what the CPU issues on a GPU.

    .venv/bin/python experiments/fast_path/count_ops.py
"""

import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from qlora_lab.fused_lora import fuse_lora, group_projections  # noqa: E402
from qlora_lab.models import attach_lora, load_model, model_path  # noqa: E402
from tests.conftest import make_cfg  # noqa: E402


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def main():
    cfg = make_cfg(
        ["model=tiny_random", "quantization=nf4", "model.dtype=float32", "lora.dropout=0"]
        + ["train.gradient_checkpointing=true"]
    )
    torch.manual_seed(0)
    model = attach_lora(load_model(model_path(cfg), cfg), cfg).train()
    model.config.use_cache = False
    ids = torch.randint(3, 1000, (2, 24))

    def step(name):
        model.zero_grad()
        with Count() as count:
            model(input_ids=ids, labels=ids).loss.backward()
        bnb = {
            k.removeprefix("bitsandbytes."): v for k, v in count.ops.items() if k.startswith("bitsandbytes")
        }
        print(f"{name}: {sum(count.ops.values())} ops, bitsandbytes {bnb}")

    fuse_lora(model, keep_weight=True)
    step("per-layer fused")
    group_projections(model, keep_weight=True)
    step("grouped projections")


if __name__ == "__main__":
    main()
