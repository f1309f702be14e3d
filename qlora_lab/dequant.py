"""4-bit weights (bitsandbytes nf4/fp4) to 16 bits for the fused LoRA layers' matmuls, on CUDA in one Triton
kernel.

bitsandbytes' dequantization kernel moved ~2.0 TB/s of weights on an H200 (8B QLoRA step, graphed layers:
256 calls, 17.7 ms a step, experiments/fast_path), against the ~4.8 TB/s the memory allows; it is the one part
of a QLoRA step that LoRA has not. This kernel reads each packed byte once, writes its two values with wide
stores and looks the 16 code values up in a table taken from bitsandbytes itself (so nf4 and fp4 are exactly
bitsandbytes' values); the block scales are fp32 (double quantization's 8-bit scales are dequantized first,
as bitsandbytes does). Elsewhere (a CPU, no Triton, another dtype) bitsandbytes' own op runs.

Written by hand: bitsandbytes has no faster kernel for this, and no library here fuses it.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: bitsandbytes' op everywhere
    triton = None

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BYTES_PER_PROGRAM = 2048  # packed bytes a program dequantizes (4,096 values)


def dequantize_4bit(
    weight, absmax, blocksize: int, quant_type: str, shape, dtype: torch.dtype
) -> torch.Tensor:
    """bitsandbytes.functional.dequantize_4bit's result, from the packed bytes and fp32 block scales."""
    if triton is not None and weight.is_cuda and dtype in DTYPES and absmax.dtype == torch.float32:
        return _triton_dequantize(weight, absmax, blocksize, quant_type, tuple(shape), dtype)
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight, absmax, blocksize, quant_type, shape, dtype)


@functools.cache
def code_values(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16 values of the 4-bit codes 0..15, as bitsandbytes' own kernel dequantizes them (scale 1)."""
    codes = torch.arange(16, dtype=torch.uint8)
    packed = (codes[0::2] << 4 | codes[1::2]).to(device)  # two codes a byte, the first in the high half
    ones = torch.ones(1, dtype=torch.float32, device=device)
    return torch.ops.bitsandbytes.dequantize_4bit.default(packed, ones, 64, quant_type, (16,), torch.float32)


def packed_bytes(weight: torch.Tensor) -> torch.Tensor:
    """The packed 4-bit weight as flat bytes, whatever container holds them (quantization.storage_dtype:
    uint8, or bf16/fp32 tensors of 4 or 8 values an element: the same bytes in the same order)."""
    flat = weight.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _triton_dequantize(weight, absmax, blocksize, quant_type, shape, dtype) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    packed = packed_bytes(weight) if weight.is_contiguous() else None
    if n % 2 or blocksize % 2 or packed is None or packed.numel() * 2 != n:
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            weight, absmax, blocksize, quant_type, shape, dtype
        )
    out = torch.empty(shape, dtype=dtype, device=weight.device)
    n_bytes = n // 2
    grid = (triton.cdiv(n_bytes, BYTES_PER_PROGRAM),)
    _dequantize_kernel[grid](
        packed,
        absmax,
        code_values(quant_type, weight.device),
        out,
        n_bytes,
        blocksize,
        BYTES=BYTES_PER_PROGRAM,
        num_warps=8,
    )
    return out


if triton is not None:

    @triton.jit
    def _dequantize_kernel(packed, absmax, table, out, n_bytes, blocksize, BYTES: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
        inside = i < n_bytes
        byte = tl.load(packed + i, mask=inside, other=0).to(tl.int32)
        scale = tl.load(
            absmax + (i * 2) // blocksize, mask=inside, other=0.0
        )  # a byte's two values: one block
        high = tl.load(table + (byte >> 4)) * scale
        low = tl.load(table + (byte & 15)) * scale
        j = tl.program_id(0).to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        values = tl.interleave(high, low)  # the high half is the first value
        tl.store(out + j, values.to(out.dtype.element_ty), mask=j < 2 * n_bytes)
