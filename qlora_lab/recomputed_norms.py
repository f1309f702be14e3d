"""Norm outputs computed again in the backward of decoder layers that keep their activations.

A decoder layer left out of gradient checkpointing (train.uncheckpointed_layers) keeps what its backward
needs. For each of its two norms that is both the norm's input (for the norm's own backward) and its output
(the LoRA projections that read it need it for the adapters' A gradients): on Llama-3-8B at 2 x 2048 tokens,
32 MiB a norm, 64 MiB a layer, that one elementwise kernel computes again from the input. Here, while such a
layer runs its forward, a tensor saved for the backward that is a norm's output is saved as "the norm of this
input" instead and computed again when the backward asks for it: the same kernel on the same input, so the
same values to the bit.

Written by hand with torch's saved-tensor hooks: torch's selective checkpointing decides per aten op and
cannot see inside the Triton kernels of Liger's norm or the fused LoRA nodes.
"""

from __future__ import annotations

import weakref

import torch

# the norms of a transformers decoder layer (Llama, Mistral, Qwen2, SmolLM2 names)
NORMS = ("input_layernorm", "post_attention_layernorm")


class _Recompute:
    __slots__ = ("norm", "x", "shape")

    def __init__(self, norm, x, shape):
        self.norm, self.x, self.shape = norm, x, shape


class RecomputedNorms:
    """The saved-tensor hooks of one decoder layer's forward, and forward hooks on its norms (hooks, not a
    replaced forward: the Trainer puts Liger's norm forward in place when training begins)."""

    def __init__(self, layer):
        self.outputs: list[tuple[weakref.ref, torch.Tensor, torch.nn.Module]] = []
        self.recomputing = False
        self.recomputed = 0  # how many saved outputs the backward computed again (tests)
        for name in NORMS:
            if hasattr(layer, name):
                getattr(layer, name).register_forward_hook(self.seen)
        forward = layer.forward

        def run(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            try:
                with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                    return forward(*args, **kwargs)
            finally:
                self.outputs.clear()

        layer.forward = run

    def seen(self, norm, args, output):
        if torch.is_grad_enabled() and not self.recomputing and torch.is_tensor(output) and args:
            self.outputs.append((weakref.ref(output), args[0], norm))

    def pack(self, t: torch.Tensor):
        for ref, x, norm in self.outputs:
            out = ref()
            if (
                out is not None
                and t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
                and t.storage_offset() == out.storage_offset()
                and t.numel() == out.numel()
                and t.dtype == out.dtype
                and t.is_contiguous()
                and out.is_contiguous()
            ):  # the output itself or a view of all of it (a live tensor's storage is not reused)
                return _Recompute(norm, x, t.shape)
        return t

    def unpack(self, packed):
        if not isinstance(packed, _Recompute):
            return packed
        self.recomputing = True
        try:
            with torch.no_grad():
                out = packed.norm(packed.x)
        finally:
            self.recomputing = False
        self.recomputed += 1
        return out.view(packed.shape)


def recompute_norms(layers) -> list[RecomputedNorms]:
    """Install RecomputedNorms on each decoder layer that is not checkpointed."""
    return [RecomputedNorms(layer) for layer in layers if not getattr(layer, "gradient_checkpointing", True)]
