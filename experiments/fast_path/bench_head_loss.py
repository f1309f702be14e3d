"""The LM head's fused loss on Llama-3-8B shapes, alone on the GPU: Liger's fused linear cross-entropy
(forward + backward, frozen head as in LoRA) at each `chunk_mem_const` (its logits chunk: chunk_mem_const x
hidden elements a row budget; 1, Liger's default, is 32 chunks of 128 rows here), against the two bf16 matmuls
it cannot avoid (logits, and the input gradient). One JSON line per setting.

    python experiments/fast_path/bench_head_loss.py [--tokens 4096] [--iters 30]
"""

from __future__ import annotations

import argparse
import json

import torch


def timed(run, iters: int) -> float:
    """Median milliseconds of `run` over `iters` calls, after 3 warm-up calls."""
    for _ in range(3):
        run()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)  # batch 2 x 2048
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--iters", type=int, default=30)
    a = parser.parse_args()
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    torch.manual_seed(0)
    dev = torch.device("cuda")
    weight = (torch.randn(a.vocab, a.hidden, device=dev) * 0.02).to(torch.bfloat16)
    hidden = torch.randn(a.tokens, a.hidden, device=dev, dtype=torch.bfloat16).requires_grad_(True)
    target = torch.randint(0, a.vocab, (a.tokens,), device=dev)

    def floor():
        logits = hidden.detach() @ weight.t()
        return logits @ weight

    flops = 2 * 2 * a.tokens * a.hidden * a.vocab
    ms = timed(floor, a.iters)
    print(json.dumps({"run": "two bf16 matmuls", "ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1)}))
    losses = {}
    for const in (1, 2, 4, 8, 16):

        def step(const=const):
            hidden.grad = None
            loss = liger_fused_linear_cross_entropy(hidden, weight, target, chunk_mem_const=const)
            loss.backward()
            return loss

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = timed(step, a.iters)
        extra = (torch.cuda.max_memory_allocated() - base) / 2**30
        losses[const] = step().item()
        print(
            json.dumps(
                {
                    "run": f"liger chunk_mem_const={const}",
                    "ms": round(ms, 3),
                    "peak_extra_gib": round(extra, 3),
                    "loss": losses[const],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
