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

Grouped projections (train.group_projections, below): the layers a decoder layer calls on one input (q/k/v,
gate/up) as one node, their weights in one buffer dequantized once per group and pass.
"""

from __future__ import annotations

import types

import torch

from .config import Config, ConfigError, GroupProjections, LoraLayers, LoraVariant, QuantMethod
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


def projections_ungrouped_reason(cfg: Config) -> str | None:
    """Why a decoder layer's projections run one fused node each, or None when they are grouped
    (train.group_projections): `on` where the LoRA layers are not fused is refused."""
    choice, unfused = cfg.train.group_projections, lora_unfused_reason(cfg)
    if choice is GroupProjections.off:
        return "train.group_projections=off"
    if unfused is None:
        return None
    if choice is GroupProjections.on:
        raise ConfigError(
            f"train.group_projections=on needs the fused LoRA layers, which are not used here ({unfused}); "
            f"set train.lora_layers=fused where it can run, or train.group_projections=auto."
        )
    return "LoRA layers not fused"


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


def _fused_call(module, x, args, kwargs):
    """(adapter name, dropout p, quant_state, compute dtype) when the fused layer computes this call of a PEFT
    LoRA layer as PEFT would; None for any call it does not cover."""
    name = module.active_adapters[0] if len(module.active_adapters) == 1 else None
    base = module.base_layer
    quant_state = getattr(base.weight, "quant_state", None)
    dropout = dropout_p(module.lora_dropout[name]) if name in module.lora_dropout else None
    if (
        args
        or kwargs
        or name not in module.lora_A
        or module.disable_adapters
        or module.merged
        or dropout is None
        or (quant_state is None and base.weight.dtype not in FLOAT_DTYPES)
        or name in module.lora_variant
        or module.lora_B[name].bias is not None
        or getattr(module, "fan_in_fan_out", False)
        or torch.is_autocast_enabled()
    ):
        return None
    dtype = (
        (getattr(base, "compute_dtype", None) or quant_state.dtype)
        if quant_state is not None
        else base.weight.dtype
    )
    return name, dropout, quant_state, dtype


def _fused_forward(self, x, *args, **kwargs):
    """Replaces `forward` on one PEFT LoRA layer; hands any call it does not cover to PEFT's own forward."""
    call = _fused_call(self, x, args, kwargs)
    if call is None:
        return type(self).forward(self, x, *args, **kwargs)
    name, dropout, quant_state, dtype = call
    return LoRALinear.apply(x, *_layer_tensors(self, name, quant_state), dropout, self._keep_weight, dtype)


def _layer_tensors(module, name: str, quant_state) -> tuple:
    """What a fused node reads of one PEFT LoRA layer: A, B, the base weight, its quant_state, bias, scale."""
    base = module.base_layer
    return (
        module.lora_A[name].weight,
        module.lora_B[name].weight,
        base.weight,
        quant_state,
        base.bias,
        module.scaling[name],
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


def keep_no_weight_unless_checkpointed(layers) -> None:
    """A decoder layer that is not recomputed (train.checkpoint_every_n_layers, train.uncheckpointed_layers)
    holds what its forward saves until its backward: a kept weight there would stay for all that time, so its
    fused layers and groups dequantize again in the backward instead."""
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False):
            continue
        for module in layer.modules():
            if hasattr(module, "_keep_weight"):
                module._keep_weight = False
            if hasattr(module, "_lora_group"):
                module._lora_group.keep_weight = False


def fuse_lora(model, keep_weight: bool = False) -> int:
    """Route every fusable LoRA layer through LoRALinear; returns how many. keep_weight: only when every
    decoder layer is checkpointed (see LoRALinear.forward); else each kept weight would live from forward to
    backward."""
    layers = fusable_layers(model)
    for module in layers:
        module.forward = types.MethodType(_fused_forward, module)
        module._keep_weight = keep_weight
    return len(layers)


# ---- grouped projections: the layers of a decoder layer that read the same input, as one node

# Sibling LoRA layers that one decoder layer calls on the same input (Llama, Mistral, Qwen, SmolLM2 names)
PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class ProjectionGroup:
    """Sibling LoRA layers (q/k/v or gate/up) whose base weights are row blocks of one buffer, so that one
    dequantization serves them all.

    4-bit: bitsandbytes packs a weight row-major, two values a byte, in blocks of `blocksize` values; when
    every weight's numel is a multiple of the blocksize, the packed bytes of [Wq; Wk; Wv] are the
    concatenation of each weight's bytes and its block scales the concatenation of each one's. The packed
    bytes are concatenated once and each module's weight becomes a view into them (no second copy: the
    adapter and every other stage see the same modules). Under double quantization each weight's 8-bit block
    scales have their own second-level scales and offset, so the group keeps them dequantized in fp32:
    4 bytes per `blocksize` parameters (on Llama-3-8B: 4,563,402,752 grouped parameters / 64 × 4 B =
    272 MiB, against the 68 MiB of their 8-bit scales, which stay for the per-layer path). Without double
    quantization the fp32 scales are concatenated and viewed the same way as the bytes: no extra memory.
    Plain LoRA: the bf16 weights are concatenated and viewed likewise, so the group costs nothing to keep
    (building it holds one group's weights twice for a moment, before training: 235 MB for an 8B gate/up
    pair); there it saves no dequantization, only nodes and A matmuls, and keeps LoRA's step comparable.
    """

    def __init__(self, members: list, keep_weight: bool):
        self.members = members
        self.keep_weight = keep_weight
        weights = [m.base_layer.weight for m in members]
        states = [getattr(w, "quant_state", None) for w in weights]
        self.quant_state = states[0]
        with torch.no_grad():
            self.weight = torch.cat([w.data for w in weights])
            offset = 0
            for w in weights:
                w.data = self.weight[offset : offset + w.shape[0]]
                offset += w.shape[0]
            if self.quant_state is not None:
                scales = [_fp32_absmax(qs) for qs in states]
                self.absmax = torch.cat(scales)
                offset = 0
                for qs, a in zip(states, scales, strict=True):
                    if not qs.nested:  # the module's own fp32 scales become a view of the group's
                        qs.absmax = self.absmax[offset : offset + a.numel()]
                    offset += a.numel()
                self.shape = (sum(qs.shape[0] for qs in states), states[0].shape[1])
        self.ptrs = [w.data_ptr() for w in weights]
        self.outs = [m.out_features for m in members]
        self.pending = None  # (input, grad mode, {member index: output}) of the last grouped call
        for i, m in enumerate(members):
            m.forward = types.MethodType(_grouped_forward, m)
            m._lora_group, m._lora_group_index = self, i

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """[Wq; Wk; Wv] in `dtype`: one dequantization kernel for the group."""
        if self.quant_state is None:
            return self.weight.to(dtype)
        qs = self.quant_state
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            self.weight, self.absmax, qs.blocksize, qs.quant_type, self.shape, dtype
        )


def _fp32_absmax(qs) -> torch.Tensor:
    if not qs.nested:
        return qs.absmax
    return torch.ops.bitsandbytes.dequantize_blockwise.default(
        qs.absmax, qs.state2.absmax, qs.state2.code, qs.state2.blocksize, torch.float32
    ).add_(qs.offset)


def _groupable(members: list) -> bool:
    """Whether sibling layers can share one buffer: same input width, device and storage, and (4-bit) the
    same quantization with every weight a whole number of blocks, so that no block straddles two weights."""
    weights = [m.base_layer.weight for m in members]
    states = [getattr(w, "quant_state", None) for w in weights]
    w0, q0 = weights[0], states[0]
    same = all(
        m.in_features == members[0].in_features
        and w.device == w0.device
        and w.dtype == w0.dtype
        and w.is_contiguous()
        and (qs is None) == (q0 is None)
        for m, w, qs in zip(members, weights, states, strict=True)
    )
    if not same or q0 is None:
        return same and w0.dtype in FLOAT_DTYPES
    return all(
        qs.blocksize == q0.blocksize
        and qs.quant_type == q0.quant_type
        and qs.dtype == q0.dtype
        and qs.shape.numel() % qs.blocksize == 0
        and len(qs.shape) == 2
        for qs in states
    )


def group_projections(model, keep_weight: bool = False) -> int:
    """Compute each decoder layer's q/k/v and gate/up LoRA layers (already fused) as one node per group;
    returns how many groups. Sets that cannot share one buffer keep the per-layer fused path."""
    fused = set(fusable_layers(model))
    children: dict[str, dict[str, torch.nn.Module]] = {}
    for name, module in model.named_modules():
        if module in fused:
            parent, _, leaf = name.rpartition(".")
            children.setdefault(parent, {})[leaf] = module
    groups = 0
    for siblings in children.values():
        for names in PROJECTION_GROUPS:
            members = [siblings[n] for n in names if n in siblings]
            if len(members) > 1 and _groupable(members):
                ProjectionGroup(members, keep_weight)
                groups += 1
    return groups


def _grouped_forward(self, x, *args, **kwargs):
    """Replaces `forward` on each layer of a ProjectionGroup. The attention (or MLP) calls its projections one
    after the other on the same tensor: whichever is called first computes the whole group and holds the
    others' outputs until they are called with that same tensor (in the same grad mode), so a recomputation
    under gradient checkpointing or an eval under no_grad simply computes the group again. Any other call
    takes the per-layer fused path."""
    group, index = self._lora_group, self._lora_group_index
    pending = group.pending
    if (
        pending is not None
        and pending[0] is x
        and pending[1] == torch.is_grad_enabled()
        and index in pending[2]
    ):
        out = pending[2].pop(index)
        if not pending[2]:
            group.pending = None
        return out
    group.pending = None
    calls = [_fused_call(m, x, args, kwargs) for m in group.members]
    if any(c is None for c in calls) or len({c[3] for c in calls}) > 1:
        return _fused_forward(self, x, *args, **kwargs)
    lora_a = [m.lora_A[c[0]].weight for m, c in zip(group.members, calls, strict=True)]
    lora_b = [m.lora_B[c[0]].weight for m, c in zip(group.members, calls, strict=True)]
    if (
        len({a.dtype for a in lora_a}) > 1
        or len({b.dtype for b in lora_b}) > 1
        or [m.base_layer.weight.data_ptr() for m in group.members] != group.ptrs  # weights moved: not views
    ):
        return _fused_forward(self, x, *args, **kwargs)
    params = lora_a + lora_b
    specs = [(m.scaling[c[0]], c[1], m.base_layer.bias) for m, c in zip(group.members, calls, strict=True)]
    outs = GroupedLoRALinear.apply(x, group, specs, calls[0][3], *params)
    group.pending = (x, torch.is_grad_enabled(), {i: o for i, o in enumerate(outs) if i != index})
    return outs[index]


class GroupedLoRALinear(torch.autograd.Function):
    """LoRALinear for n layers on one input: y_i = x·W_iᵀ + s_i·(x·A_iᵀ)·B_iᵀ with [W_1; …; W_n] dequantized
    once. The base GEMMs stay one per layer, on row blocks of the one weight: each output is then contiguous,
    as the attention's views and Liger's kernels expect (one GEMM into [x·W_1ᵀ | … ] would need a copy per
    output to get there). Without dropout the adapters' A GEMMs are one ([A_1; …; A_n] concatenated), in the
    forward and in both of the backward's."""

    @staticmethod
    def forward(ctx, x, group, specs, dtype, *params):
        n = len(specs)
        ctx.ranks = [p.shape[0] for p in params[:n]]
        a_cat = torch.cat(params[:n]).to(dtype)  # one cast for all A's (fp32 adapters: 2 kernels, not n)
        lora_a, lora_b = a_cat.split(ctx.ranks), [p.to(dtype) for p in params[n:]]
        w = group.base_weight(dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        ctx.dropout = any(p for _, p, _ in specs)
        if not ctx.dropout:
            xa_cat = torch.mm(x2, a_cat.t())
            xas = xa_cat.split(ctx.ranks, dim=1)
        else:  # each layer draws its own dropout mask, in order, as PEFT's layers do
            xds, masks = zip(
                *(torch.native_dropout(x2, p, True) if p else (x2, None) for _, p, _ in specs), strict=True
            )
            xas = [torch.mm(xd, a.t()) for xd, a in zip(xds, lora_a, strict=True)]
        outs, rows = [], w.split(group.outs)
        for (scale, _, bias), w_i, xa, b in zip(specs, rows, xas, lora_b, strict=True):
            y = torch.mm(x2, w_i.t()).addmm_(xa, b.t(), alpha=scale)
            if bias is not None:
                y.add_(bias.to(y.dtype))
            outs.append(y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype))
        kept = group.keep_weight and group.quant_state is not None
        ctx.group, ctx.specs, ctx.kept, ctx.n = group, specs, kept, n
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
        ctx.param_dtypes = params[0].dtype, params[n].dtype  # the A's, the B's (one dtype each)
        # kept (LoRALinear's keep_weight): the backward reuses this dequantized weight, else dequantizes
        # again. Each tensor is saved once: activation offload copies every saved tensor to the host.
        saved = [w if kept else None, a_cat, *lora_b]
        if not ctx.dropout:
            ctx.save_for_backward(*saved, x2, xa_cat)
        else:
            ctx.has_mask = [m is not None for m in masks]
            ctx.save_for_backward(*saved, *xds, *xas, *[m for m in masks if m is not None])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        n, (weight, a_cat, *saved) = ctx.n, ctx.saved_tensors
        lora_b, saved = saved[:n], saved[n:]
        if not ctx.dropout:
            x2, xa_cat = saved
            xds, xas = [x2] * n, xa_cat.split(ctx.ranks, dim=1)
        else:
            xds, xas, masks = saved[:n], saved[n : 2 * n], iter(saved[2 * n :])
            masks = [next(masks) if has else None for has in ctx.has_mask]
        dtype = xds[0].dtype
        gs = [g.reshape(-1, g.shape[-1]).to(dtype) for g in grads]
        scales = [s for s, _, _ in ctx.specs]
        gxas = [torch.mm(g, b).mul_(s) for g, b, s in zip(gs, lora_b, scales, strict=True)]  # d loss / d x·Aᵀ
        gxa_cat = None if ctx.dropout else torch.cat(gxas, dim=1)
        grad_a, grad_b = [None] * n, [None] * n
        if any(ctx.needs_input_grad[4 : 4 + n]):
            grad_a_cat = (
                torch.cat([torch.mm(gxa.t(), xd) for gxa, xd in zip(gxas, xds, strict=True)])
                if ctx.dropout
                else torch.mm(gxa_cat.t(), x2)
            )
            grad_a = grad_a_cat.to(ctx.param_dtypes[0]).split(ctx.ranks)
        if any(ctx.needs_input_grad[4 + n :]):
            grad_b = [
                torch.mm(g.t(), xa).mul_(s).to(ctx.param_dtypes[1])
                for g, xa, s in zip(gs, xas, scales, strict=True)
            ]
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = weight if ctx.kept else ctx.group.base_weight(dtype)
            rows = w.split(ctx.group.outs)
            grad_x = torch.mm(gs[0], rows[0])
            for g, w_i in zip(gs[1:], rows[1:], strict=True):
                grad_x.addmm_(g, w_i)
            if not ctx.dropout:
                grad_x.addmm_(gxa_cat, a_cat)
            else:
                lora_a = a_cat.split(ctx.ranks)
                for gxa, a, mask, (_, p, _) in zip(gxas, lora_a, masks, ctx.specs, strict=True):
                    if mask is None:
                        grad_x.addmm_(gxa, a)
                    else:
                        grad_x.add_(
                            torch.ops.aten.native_dropout_backward(torch.mm(gxa, a), mask, 1 / (1 - p))
                        )
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return (grad_x, None, None, None, *grad_a, *grad_b)


# ---- the MLP's SwiGLU and its down projection as one node


# torch's and transformers' (ACT2FN["silu"]) modules for silu: nothing but torch.nn.functional.silu
SILU_CLASSES = ("SiLU", "SiLUActivation")
# Liger's SwiGLU MLP (silu only), which keeps no act_fn: once Liger has patched a model class in a process,
# every later model of that class is built with it
LIGER_SWIGLU = "LigerSwiGLUMLP"


def swiglu_mlps(model) -> list:
    """The SwiGLU MLPs (gate_proj, up_proj, silu, down_proj) whose down projection is a fused LoRA layer."""
    return [
        module
        for module in model.modules()
        if hasattr(getattr(module, "down_proj", None), "_keep_weight")
        and hasattr(module, "gate_proj")
        and hasattr(module, "up_proj")
        and (
            type(getattr(module, "act_fn", None)).__name__ in SILU_CLASSES
            or type(module).__name__ == LIGER_SWIGLU  # made after Liger replaced transformers' class
        )
    ]


def fuse_swiglu_down(model, liger: bool) -> int:
    """Compute each of swiglu_mlps' down_proj(silu(gate) * up) as one node (SwiGLULoRALinear); returns how
    many MLPs. liger: the product by Liger's SwiGLU kernels, as Liger's MLP computes it, else by torch, as
    transformers' MLP does. Under the Trainer, call it once training has begun: train() puts Liger's MLP
    forward in place first."""
    mlps = swiglu_mlps(model)
    for module in mlps:
        module.forward = types.MethodType(_swiglu_down_forward, module)
        module._swiglu_liger = liger or type(module).__name__ == LIGER_SWIGLU
    return len(mlps)


def _swiglu(gate, up, liger: bool) -> torch.Tensor:
    if liger:
        from liger_kernel.ops.swiglu import swiglu_forward

        return swiglu_forward(gate, up)[2]
    return torch.nn.functional.silu(gate) * up


def _swiglu_down_forward(self, x):
    """Replaces `forward` on a SwiGLU MLP: the down projection and the product before it are one node when the
    down projection's fused call covers it without dropout (a dropout mask on the product would have to be
    kept, which is what this node saves); otherwise the MLP as before."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    call = _fused_call(down, gate, (), {})
    if call is None or call[1] or gate.shape != up.shape or gate.dtype != up.dtype:
        if self._swiglu_liger:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            return down(LigerSiLUMulFunction.apply(gate, up))
        return down(torch.nn.functional.silu(gate) * up)  # what the silu modules compute
    name, _, quant_state, dtype = call
    return SwiGLULoRALinear.apply(
        gate.contiguous(),
        up.contiguous(),
        *_layer_tensors(down, name, quant_state),
        down._keep_weight,
        dtype,
        self._swiglu_liger,
    )


class SwiGLULoRALinear(torch.autograd.Function):
    """LoRALinear (no dropout) on p = silu(gate) * up, computing p too. The SwiGLU's backward needs gate and
    up, and the adapter's A gradient needs p: a SwiGLU node and a LoRA node save all three, this one saves
    gate and up and computes p again in the backward (one elementwise kernel). On Llama-3-8B at 4,096 tokens
    p is 112 MiB, a fifth of what a decoder layer keeps when it is not checkpointed. The same kernels as the
    two nodes it replaces: the same results to the bit."""

    @staticmethod
    def forward(ctx, gate, up, lora_a, lora_b, weight, quant_state, bias, scale, keep_weight, dtype, liger):
        w = base_weight(weight, quant_state, dtype)
        p = _swiglu(gate, up, liger)
        p2 = p.reshape(-1, p.shape[-1]).to(dtype)
        a, b = lora_a.to(w.dtype), lora_b.to(w.dtype)
        xa = torch.mm(p2, a.t())
        y = torch.mm(p2, w.t()).addmm_(xa, b.t(), alpha=scale)
        if bias is not None:
            y.add_(bias.to(y.dtype))
        kept = keep_weight and quant_state is not None  # as LoRALinear's keep_weight
        ctx.save_for_backward(gate, up, xa, a, b, w if kept else weight)
        ctx.quant_state = None if kept else quant_state
        ctx.scale, ctx.liger, ctx.dtype = scale, liger, dtype
        ctx.param_dtypes = lora_a.dtype, lora_b.dtype
        return y.view(*p.shape[:-1], y.shape[-1]).to(p.dtype)

    @staticmethod
    def backward(ctx, grad):
        gate, up, xa, a, b, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(ctx.dtype)
        gxa = torch.mm(g, b).mul_(ctx.scale)
        grad_a = grad_b = grad_gate = grad_up = None
        if ctx.needs_input_grad[2]:
            p2 = _swiglu(gate, up, ctx.liger)
            grad_a = torch.mm(gxa.t(), p2.reshape(-1, p2.shape[-1]).to(ctx.dtype)).to(ctx.param_dtypes[0])
            del p2
        if ctx.needs_input_grad[3]:
            grad_b = torch.mm(g.t(), xa).mul_(ctx.scale).to(ctx.param_dtypes[1])
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_p = torch.mm(g, base_weight(weight, ctx.quant_state, ctx.dtype)).addmm_(gxa, a)
            grad_p = grad_p.view(gate.shape).to(gate.dtype)
            if (
                ctx.liger
            ):  # Liger's backward writes the two gradients over gate and up, which nothing reads after
                from liger_kernel.ops.swiglu import swiglu_backward

                grad_gate, grad_up = swiglu_backward(gate, up, grad_p)
            else:  # as autograd differentiates silu(gate) * up
                grad_up = grad_p * torch.nn.functional.silu(gate)
                grad_gate = torch.ops.aten.silu_backward(grad_p * up, gate)
        return grad_gate, grad_up, grad_a, grad_b, None, None, None, None, None, None, None
