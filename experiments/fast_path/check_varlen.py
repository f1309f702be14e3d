"""Checks, on the GPU, that qlora_lab/attention.py's varlen path computes what sdpa with the block-diagonal
mask computes (forward and gradients, Llama-3-8B head shapes with grouped key/value heads, bf16). Exit 1 on a
mismatch.

    python3 experiments/fast_path/check_varlen.py
"""

import sys

import torch
import torch.nn.functional as F

from qlora_lab.attention import varlen_attention_forward


class Attn(torch.nn.Module):
    num_key_value_groups = 4
    is_causal = True


torch.manual_seed(0)
lengths = [700, 1, 333, 1014, 2000]
total, heads, kv_heads, dim = sum(lengths), 32, 8, 128
q, k, v = (
    torch.randn(1, h, total, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for h in (heads, kv_heads, kv_heads)
)
cu = torch.tensor([sum(lengths[:i]) for i in range(len(lengths) + 1)], device="cuda", dtype=torch.int32)
out, _ = varlen_attention_forward(
    Attn(),
    q,
    k,
    v,
    None,
    scaling=dim**-0.5,
    cu_seq_lens_q=cu,
    cu_seq_lens_k=cu,
    max_length_q=max(lengths),
    max_length_k=max(lengths),
)
seq = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"), torch.tensor(lengths, device="cuda"))
mask = (seq[:, None] == seq[None, :]) & torch.ones(total, total, dtype=torch.bool, device="cuda").tril()
ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask)
ref = ref.transpose(1, 2)
grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
errors = {"out": (out - ref).abs().max().item()} | {
    f"grad_{n}": ((g - r).abs().max() / r.abs().max()).item()
    for n, g, r in zip("qkv", grads, ref_grads, strict=True)
}
print("varlen vs masked sdpa, max abs (out) / max relative (grads) difference:", errors, flush=True)
sys.exit(0 if errors["out"] < 2e-2 and max(errors.values()) < 5e-2 else 1)
