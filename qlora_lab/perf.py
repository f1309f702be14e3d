"""Benchmark figures a performance engineer can check: model FLOPs per token, MFU, step-time spread.

MFU (model FLOPs utilisation, PaLM, Chowdhery et al. 2022, appendix B) = the FLOPs the model needs per second
at the measured throughput ÷ the GPU's peak dense bf16 FLOP/s. Recomputation (gradient checkpointing) is not
counted: it is work the recipe adds, not work the model needs. For LoRA the frozen weights need no weight
gradient, so a token costs

    2·N (forward) + 2·N (backward, input gradients) + 6·N_lora (adapters: forward, input and weight gradients)
    + 12·L·d·c (attention scores and values: 4·d·c forward per layer, twice that backward)

with N the frozen matmul weights (every linear layer, the LM head included; the embedding is a lookup), L
layers, d = heads × head size, c the mean number of tokens each token attends to (causal, within its own
example).
"""

from __future__ import annotations

import copy
import statistics

import torch

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity). Longest name first.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10G", 70.0),
]


def peak_tflops(override: float | None = None) -> tuple[float | None, str | None]:
    """(peak TFLOP/s, where the figure comes from) for this process's GPU; (None, None) when unknown or on a
    CPU."""
    if override:
        return override, "train.peak_tflops"
    if not torch.cuda.is_available():
        return None, None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"{key} dense bf16 datasheet"
    return None, None


def matmul_params(config) -> int:
    """Weights of every linear layer of the architecture (built on the meta device: no memory, no time)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # count the architecture's weights, not the packed 4-bit ones
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def flops_per_token(config, trainable: int, mean_context: float) -> float:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    frozen = matmul_params(config)
    return 4 * frozen + 6 * trainable + 12 * text.num_hidden_layers * heads * head_dim * mean_context


def step_time_spread(step_s: list[float]) -> dict:
    return {
        "train/step_time_min_s": min(step_s),
        "train/step_time_median_s": statistics.median(step_s),
        "train/step_time_max_s": max(step_s),
    }
