"""Attention for packed rows through PyTorch's own FlashAttention varlen kernel (`torch.nn.attention.varlen`,
torch >= 2.10, CUDA, bf16/fp16): each example of a packed batch attends only within itself, with no mask built
and no work spent on the masked-out blocks.

Written by hand because transformers reaches varlen attention only through the flash-attn package (no wheel
installable here) or hub kernels (no network), while PyTorch ships the kernel. Registered as one more
attention implementation; a batch without sequence boundaries (eval with padding, generation) takes
transformers' sdpa.
"""

from __future__ import annotations

import functools
import inspect

import torch

from .config import Config, ConfigError, PackedAttention

NAME = "qlora_lab_varlen"


def varlen_kernel():
    """PyTorch's varlen attention function, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def available(dtype: torch.dtype) -> bool:
    """Whether packed rows can use the varlen kernel here: a CUDA GPU, a torch that has it, a 16-bit model."""
    return (
        torch.cuda.is_available() and varlen_kernel() is not None and dtype in (torch.bfloat16, torch.float16)
    )


def packed_varlen(cfg: Config, dtype: torch.dtype) -> bool:
    """Whether packed rows use the varlen kernel (train.packed_attention), the one rule for validate() and the
    train stage: `auto` where it is available, an explicit `varlen` that cannot run refused."""
    mode = cfg.train.packed_attention
    if mode is PackedAttention.varlen:
        if not cfg.dataset.pack:
            raise ConfigError(
                "train.packed_attention=varlen keeps packed examples apart, but dataset.pack=false; set "
                "dataset.pack=true or train.packed_attention=auto."
            )
        if not available(dtype):
            why = (
                "this torch has no torch.nn.attention.varlen (torch >= 2.10)"
                if varlen_kernel() is None
                else "it needs a CUDA GPU and a bf16 or fp16 model.dtype"
            )
            raise ConfigError(
                f"train.packed_attention=varlen is not available: {why}; use train.packed_attention=auto."
            )
    return cfg.dataset.pack and (
        mode is PackedAttention.varlen or (mode is PackedAttention.auto and available(dtype))
    )


@functools.cache  # once per kernel, not per layer and step
def _causal_kwargs(kernel) -> dict:
    params = inspect.signature(kernel).parameters
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}  # its first form
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = (
            True  # fewer key/value heads than query heads (Llama 3); FlashAttention takes them as is
        )
    return kwargs


def varlen_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q=None,
    cu_seq_lens_k=None,
    max_length_q=None,
    max_length_k=None,
    **kwargs,
):
    """transformers' attention interface: query/key/value are [batch, heads, tokens, head_dim]; returns
    ([batch, tokens, heads, head_dim], None). Packed batches (one row, boundaries in cu_seq_lens_*) go to the
    varlen kernel; any other batch to sdpa with transformers' own mask."""
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise ValueError(
            f"{NAME} has no attention dropout (the model asks for {dropout}); train with "
            f"train.packed_attention=mask"
        )
    kernel = varlen_kernel()
    batch, heads, tokens, dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(batch * tokens, t.shape[1], dim) for t in (query, key, value))
    out = kernel(
        q,
        k,
        v,
        cu_seq_lens_q,
        cu_seq_lens_k,
        max_length_q,
        max_length_k,
        scale=scaling,
        **_causal_kwargs(kernel),
    )
    return out.view(batch, tokens, heads, dim), None


def varlen_mask(*args, attention_mask=None, **kwargs):
    """transformers' mask interface: no mask for packed rows (the boundaries travel as cu_seq_lens), sdpa's
    mask when a padded batch brings a 2D attention mask."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def use_varlen(model) -> None:
    """Switch a loaded model's attention to the varlen kernel for packed batches."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, varlen_mask)
    skip_packed_sequence_detection()
    model.set_attn_implementation(NAME)


def skip_packed_sequence_detection() -> None:
    """Before building a mask, transformers looks for packed sequences in the position ids whenever no 2D mask
    is given, and its test of what it found (`.all()` on a GPU tensor) is a synchronize at every forward: the
    host waits for the GPU to finish the step before, which then waits for the host. Under this attention
    there is no mask to build for such a batch (varlen_mask returns None; the boundaries travel as
    cu_seq_lens), so the mask preparation is given no position ids and skips the search. Written by hand: no
    transformers setting turns the search off."""
    import transformers.masking_utils as masking

    original = masking._preprocess_mask_arguments
    if getattr(original, "skips_varlen_search", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def preprocess(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        given = bound.arguments
        if given["config"]._attn_implementation == NAME and given.get("attention_mask") is None:
            given["position_ids"] = None
        return original(*bound.args, **bound.kwargs)

    preprocess.skips_varlen_search = True
    masking._preprocess_mask_arguments = preprocess
