"""Several processes, several GPUs: who this process is, which device it uses, and the launch rules.

`accelerate launch` (torchrun underneath) tells each process its rank through the environment; accelerate's
PartialState turns that into a process group and a device, and makes the rank's GPU the current CUDA device
(bitsandbytes quantizes on the current device, and FSDP refuses a model whose weights sit on another GPU).
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DDP_CONFIG = "accelerate/ddp_2gpu.yaml"
FSDP_CONFIG = "accelerate/fsdp_2gpu.yaml"


# Rank and world size are read from what the launcher set, not from PartialState: PartialState() joins the
# process group (it waits for every rank, and picks the rank's GPU), which must wait until validate() has
# checked the launch (check_launch), and Hydra's callbacks ask for the rank before that.
def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """False on the non-zero ranks of a distributed launch: only rank 0 writes files."""
    return rank() == 0


def fsdp_enabled() -> bool:
    """True under `accelerate launch` with an FSDP config (accelerate tells the ranks through this
    variable)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def device() -> torch.device:
    """This process's device: the GPU of its local rank under a distributed launch, else the first GPU or the
    CPU."""
    import torch

    if world_size() > 1:
        from accelerate import PartialState

        return PartialState().device
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def cap_gpu_memory(gib: float | None) -> str | None:
    """train.gpu_memory_cap_gib: let this process allocate at most `gib` GiB of its GPU (a smaller card on a
    larger one); beyond it, out of memory as on that card. Returns the line that says so, or None (no cap, or
    no GPU)."""
    import torch

    if gib is None or not torch.cuda.is_available():
        return None
    target = device()
    total = torch.cuda.get_device_properties(target).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), target)
    return (
        f"GPU memory capped at {gib:g} GiB of {total / 2**30:.1f} GiB on {target} (train.gpu_memory_cap_gib)"
    )


def launch_command(n_gpus: int) -> str:
    """The command that runs this same job on `n_gpus` GPUs with DDP."""
    overrides = " ".join(shlex.quote(a) for a in sys.argv[1:])
    command = (
        f"accelerate launch --config_file {DDP_CONFIG} --num_processes {n_gpus} -m qlora_lab {overrides}"
    )
    return command.rstrip()


def one_gpu_per_process(args) -> str | None:
    """A plain launch on a machine with several GPUs would get the Trainer's nn.DataParallel over all of them:
    unasked, with the batch multiplied, and slower per GPU than DDP. Keep one GPU per process instead (the
    Trainer forces `_n_gpu = 1` itself for model-parallel models) and return the line that says how to use
    them all."""
    n = args.n_gpu
    if world_size() > 1 or n <= 1:
        return None
    args._n_gpu = 1
    return (
        f"{n} GPUs visible; training on the first only (one process, no DataParallel). To train on all {n} "
        f"with DDP: {launch_command(n)}"
    )


def check_launch(batch_size, storage_dtype, model_dtype) -> str | None:
    """What a distributed launch cannot do, as one sentence naming the setting and the fix (validate() raises
    it)."""
    if world_size() <= 1:
        return None
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    gpus = torch.cuda.device_count()
    if gpus and local > gpus:
        return (
            f"accelerate launch started {local} processes on this machine but it has {gpus} GPUs; set "
            f"num_processes to at most {gpus} (--num_processes {gpus}, or num_processes: in the accelerate "
            "config)."
        )
    if batch_size == "auto":
        return (
            "train.batch_size=auto lets each rank halve its batch after its own out-of-memory errors, so the "
            "ranks could train on different batches; under accelerate launch set train.batch_size to a "
            "number."
        )
    if fsdp_enabled() and storage_dtype is not None and storage_dtype != model_dtype:
        return (
            f"FSDP shards flat parameters of one dtype, but quantization.storage_dtype={storage_dtype} "
            f"differs from the model dtype {model_dtype}; set quantization.storage_dtype=auto (the model "
            "dtype)."
        )
    return None
