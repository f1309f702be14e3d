"""4-bit dequantization alone, on a GPU: bitsandbytes' op against qlora_lab.dequant's Triton kernel (and a
few of its launch settings) on Llama-3-8B's grouped weights, nf4 in bf16 containers (storage_dtype: auto),
fp32 block scales. Prints one JSON line per case: time per call and the bytes moved per second (packed
bytes and fp32 scales read, bf16 values written).
    python experiments/fast_path/bench_dequant.py > dequant_bench.jsonl
"""

import functools
import json

import bitsandbytes.functional as F
import torch
import triton

from qlora_lab import dequant

SHAPES = {
    "q/k/v group": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate/up group": (28672, 4096),
    "down_proj": (4096, 14336),
}


def timed(fn, reps: int = 50) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def kernel(packed, absmax, shape, nbytes: int, warps: int) -> torch.Tensor:
    n = shape[0] * shape[1]
    out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    dequant._dequantize_kernel[(triton.cdiv(n // 2, nbytes),)](
        packed,
        absmax,
        dequant.code_values("nf4", packed.device),
        out,
        n // 2,
        64,
        BYTES=nbytes,
        num_warps=warps,
    )
    return out


def bench(name: str, shape: tuple[int, int]) -> None:
    q, qs = F.quantize_4bit(
        torch.randn(shape, device="cuda", dtype=torch.bfloat16),
        blocksize=64,
        quant_type="nf4",
        quant_storage=torch.bfloat16,
    )
    n = shape[0] * shape[1]
    moved = n // 2 + n // 64 * 4 + n * 2
    args = (q, qs.absmax, 64, "nf4", shape, torch.bfloat16)
    ref = torch.ops.bitsandbytes.dequantize_4bit.default(*args)
    cases = {
        "bitsandbytes": functools.partial(torch.ops.bitsandbytes.dequantize_4bit.default, *args),
        "qlora_lab.dequant (as shipped)": functools.partial(dequant.dequantize_4bit, *args),
    }
    for nbytes in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            run = functools.partial(kernel, dequant.packed_bytes(q), qs.absmax, shape, nbytes, warps)
            assert torch.equal(run(), ref)
            cases[f"triton {nbytes} B/program, {warps} warps"] = run
    for case, fn in cases.items():
        s = timed(fn)
        row = {"weight": name, "shape": shape, "case": case, "us": round(s * 1e6, 1)}
        print(json.dumps({**row, "tb_per_s": round(moved / s / 1e12, 2)}), flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    for name, shape in SHAPES.items():
        bench(name, shape)
