"""Diagnostics for a `python -m qlora_lab` training run, switched on by putting this folder first on
PYTHONPATH (experiments/gpu.sh's `diag24` stage): after the first step (where train.cuda_graphs captures)
the GPU memory by pool and stream, then the peak of the later steps; and every host-device synchronize
of steps 4-5 with the Python stack that made it (torch.cuda.set_sync_debug_mode). Prints lines starting
with `[diag]`."""

import traceback
import warnings

import torch
import transformers

_seen: set = set()


def _show(message, category, filename, lineno, file=None, line=None):
    if "synchroniz" not in str(message):
        return print(f"[diag] warning: {message}")
    stack = [f for f in traceback.extract_stack()[:-2] if "warnings.py" not in f.filename]
    frames = tuple(
        f"{f.filename.split('site-packages/')[-1].split('/work/')[-1]}:{f.lineno} {f.name}"
        for f in stack[-8:]
    )
    if frames not in _seen:
        _seen.add(frames)
        print(f"[diag] sync: {message}\n[diag]   " + "\n[diag]   ".join(frames), flush=True)


def _memory(label: str) -> None:
    gib = 2**30
    print(
        f"[diag] {label}: allocated {torch.cuda.memory_allocated() / gib:.2f} GiB, peak allocated "
        f"{torch.cuda.max_memory_allocated() / gib:.2f}, reserved {torch.cuda.memory_reserved() / gib:.2f}, "
        f"peak reserved {torch.cuda.max_memory_reserved() / gib:.2f}",
        flush=True,
    )
    groups: dict = {}
    for s in torch.cuda.memory_snapshot():
        key = (str(s.get("segment_pool_id")), s["stream"])
        g = groups.setdefault(key, [0, 0, 0, []])
        g[0] += s["total_size"]
        g[1] += s["allocated_size"]
        g[2] += 1
        g[3] += [b["size"] for b in s["blocks"] if b["state"] == "active_allocated"]
    for (pool, stream), (total, alloc, n, blocks) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        big = sorted(blocks, reverse=True)[:8]
        print(
            f"[diag]   pool {pool} stream {stream}: {n} segments, reserved {total / gib:.2f} GiB, allocated "
            f"{alloc / gib:.2f}; largest blocks MiB {[round(b / 2**20) for b in big]}, {len(blocks)} blocks",
            flush=True,
        )


class Diag(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 3:
            warnings.showwarning = _show
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        if state.global_step == 5:
            torch.cuda.set_sync_debug_mode(0)

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        if state.global_step == 1:
            _memory("after step 1")
            torch.cuda.reset_peak_memory_stats()
        if state.global_step == 8:
            _memory("steps 2-8")


_init = transformers.Trainer.__init__


def _trainer_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.add_callback(Diag())


transformers.Trainer.__init__ = _trainer_init
