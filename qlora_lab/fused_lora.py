"""One autograd function per LoRA layer: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ, W dequantized on the fly from 4 bits (QLoRA)
or used as is (LoRA).

A (Q)LoRA step on a GPU is bound by the CPU issuing kernels (experiments/fast_path). PEFT computes such a
layer as a chain of modules and autograd nodes: the base matmul (bitsandbytes' for 4 bits), a defensive clone,
a cast of the input to the adapter's fp32, two linears, a scaling, a cast back and an add; the backward walks
each of them. Here the same layer is one node with the matmuls alone: the adapter runs in the base's compute
dtype (bf16), as it does under the paper recipe's autocast, and its gradients land in the adapter's own dtype.

Written by hand because neither PEFT nor bitsandbytes has a fused LoRA layer (Unsloth has its own). Used only
where it computes what PEFT's layer does: one active plain-LoRA adapter (no DoRA, no adapter bias), unmerged,
and no autocast; any other call takes PEFT's own forward.
"""

from __future__ import annotations

import types

import torch

from .config import Config, ConfigError, LoraLayers, LoraVariant, QuantMethod
from .distributed import fsdp_enabled


def lora_unfused_reason(cfg: Config) -> str | None:
    """Why the LoRA layers run as PEFT's modules, or None when they run fused (train.lora_layers): the one
    rule for validate() and the train stage. `fused` where it cannot compute what PEFT's layer does is
    refused; `auto` fuses on CUDA only, and not under FSDP (not tried with its shards)."""
    t = cfg.train
    dora = cfg.lora.variant is LoraVariant.dora
    blocker = (
        ("autocast on", "train.autocast must be false (the fused layer computes in the base's dtype)")
        if t.autocast
        else ("8-bit base", "quantization=int8 layers have no fused form")
        if cfg.quantization.method is QuantMethod.int8
        else ("lora.variant=dora, which the fused layers do not cover", "lora.variant=dora has no fused form")
        if dora
        else ("FSDP", "the fused layers are not tried on FSDP's sharded weights (train with DDP or one GPU)")
        if fsdp_enabled()
        else None
    )
    if t.lora_layers is LoraLayers.fused:
        if blocker:
            raise ConfigError(
                f"train.lora_layers=fused cannot be used here: {blocker[1]}; fix that or use "
                f"train.lora_layers=auto."
            )
        return None
    if t.lora_layers is LoraLayers.peft:
        return "train.lora_layers=peft"
    return (
        "lora.variant=dora, which the fused layers do not cover"
        if dora
        else "no CUDA GPU"
        if not torch.cuda.is_available()
        else "FSDP"
        if fsdp_enabled()
        else blocker[0]
        if blocker
        else None
    )


def base_weight(weight, quant_state, dtype: torch.dtype):
    """The base layer's weight [out, in] in `dtype`: dequantized from 4 bits when quant_state is set.
    bitsandbytes' own ops, called as bitsandbytes.functional.dequantize_4bit calls them, less its checks."""
    if quant_state is None:
        return weight.to(dtype)
    qs, absmax = quant_state, quant_state.absmax
    if qs.nested:  # double quantization: the block scales are themselves 8-bit blocks
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            absmax, qs.state2.absmax, qs.state2.code, qs.state2.blocksize, torch.float32
        ).add_(qs.offset)
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        weight, absmax, qs.blocksize, qs.quant_type, qs.shape, dtype
    )


class LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x,
        lora_a,
        lora_b,
        weight,
        quant_state,
        bias,
        scale: float,
        dropout: float,
        keep_weight: bool,
        dtype: torch.dtype,
    ):
        w = base_weight(weight, quant_state, dtype)  # dtype: the base layer's compute dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a, b = lora_a.to(w.dtype), lora_b.to(w.dtype)
        # LoRA dropout acts on the adapter's input only; the mask is kept for the backward, as nn.Dropout
        # keeps it
        xd, mask = torch.native_dropout(x2, dropout, True) if dropout else (x2, None)
        xa = torch.mm(xd, a.t())
        y = torch.mm(x2, w.t()).addmm_(xa, b.t(), alpha=scale)
        if bias is not None:
            y.add_(bias.to(y.dtype))
        # keep_weight: the backward reuses the dequantized weight instead of dequantizing again. Only under
        # per-layer checkpointing, where what a layer saves is dropped after the forward and held from its
        # recomputation to its backward: one layer's bf16 weights at a time.
        kept = keep_weight and quant_state is not None
        ctx.save_for_backward(xd, xa, a, b, w if kept else weight, mask)
        quant_state = None if kept else quant_state
        ctx.quant_state, ctx.scale, ctx.dropout, ctx.x_dtype, ctx.x_shape = (
            quant_state,
            scale,
            dropout,
            x.dtype,
            x.shape,
        )
        ctx.param_dtypes = lora_a.dtype, lora_b.dtype
        return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)  # as bitsandbytes returns: in the input's dtype

    @staticmethod
    def backward(ctx, grad):
        xd, xa, a, b, weight, mask = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(xd.dtype)
        gxa = torch.mm(g, b).mul_(ctx.scale)  # d loss / d (x·Aᵀ)
        grad_a = grad_b = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_a = torch.mm(gxa.t(), xd).to(ctx.param_dtypes[0])
        if ctx.needs_input_grad[2]:
            grad_b = torch.mm(g.t(), xa).mul_(ctx.scale).to(ctx.param_dtypes[1])
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, base_weight(weight, ctx.quant_state, xd.dtype))
            if mask is None:
                grad_x.addmm_(gxa, a)
            else:
                grad_x.add_(
                    torch.ops.aten.native_dropout_backward(torch.mm(gxa, a), mask, 1 / (1 - ctx.dropout))
                )
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, grad_a, grad_b, None, None, None, None, None, None, None


def dropout_p(module) -> float | None:
    """The LoRA dropout probability this call applies (0 when off or in eval mode); None for a kind of dropout
    the fused layer does not know."""
    if isinstance(module, torch.nn.Identity):
        return 0.0
    if type(module) is torch.nn.Dropout:
        return module.p if module.training else 0.0
    return None


def _fused_forward(self, x, *args, **kwargs):
    """Replaces `forward` on one PEFT LoRA layer; hands any call it does not cover to PEFT's own forward."""
    name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    base = self.base_layer
    quant_state = getattr(base.weight, "quant_state", None)
    dropout = dropout_p(self.lora_dropout[name]) if name in self.lora_dropout else None
    if (
        args
        or kwargs
        or name not in self.lora_A
        or self.disable_adapters
        or self.merged
        or dropout is None
        or (quant_state is None and base.weight.dtype not in FLOAT_DTYPES)
        or name in self.lora_variant
        or self.lora_B[name].bias is not None
        or getattr(self, "fan_in_fan_out", False)
        or torch.is_autocast_enabled()
    ):
        return type(self).forward(self, x, *args, **kwargs)
    dtype = (
        (getattr(base, "compute_dtype", None) or quant_state.dtype)
        if quant_state is not None
        else base.weight.dtype
    )
    return LoRALinear.apply(
        x,
        self.lora_A[name].weight,
        self.lora_B[name].weight,
        base.weight,
        quant_state,
        base.bias,
        self.scaling[name],
        dropout,
        self._keep_weight,
        dtype,
    )


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fusable_layers(model) -> list:
    """PEFT's LoRA layers over a plain linear or a bitsandbytes 4-bit one (not 8-bit, not embeddings)."""
    from peft.tuners.lora.layer import Linear

    kinds = [Linear]
    try:
        from peft.tuners.lora.bnb import Linear4bit

        kinds.append(Linear4bit)
    except ImportError:  # bitsandbytes not installed: PEFT defines no 4-bit layer
        pass
    return [
        m for m in model.modules() if type(m) in kinds
    ]  # exactly: torchao's and others' subclasses stay PEFT's


def fuse_lora(model, keep_weight: bool = False) -> int:
    """Route every fusable LoRA layer through LoRALinear; returns how many. keep_weight: only when every
    decoder layer is checkpointed (see LoRALinear.forward); else each kept weight would live from forward to
    backward."""
    layers = fusable_layers(model)
    for module in layers:
        module.forward = types.MethodType(_fused_forward, module)
        module._keep_weight = keep_weight
    return len(layers)
