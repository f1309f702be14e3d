"""The causal LM's training loss under FSDP without gathering the LM head.

FSDP2 shards the LM head's weight by rows, that is by vocabulary: each rank holds the logits' columns of one
slice of the vocabulary. Gathering the head whole for the loss puts a whole head on every rank at once (1.96
GiB on Llama-3-70B, what kept 70B above a 24 GiB card); gathering the ranks' final hidden states instead moves
tokens x hidden (64 MiB there). So every rank computes, for all ranks' tokens, the logits of its own slice in
chunks of tokens (never the whole logits); the log-sum-exp and the target's logit are combined across ranks
(three numbers per token); and each token's input gradient, the sum of the slices' parts, goes back to the
rank that owns the token. As Liger's fused loss does, the input gradient is computed in the forward, so no
logits are kept for the backward; the LM head is frozen under LoRA, so no weight gradient is needed.

Written by hand: Megatron's vocab-parallel cross-entropy does this for tensor parallelism, where every rank
has the same tokens; under FSDP every rank has its own, and no library used here has this form."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**26  # logits per chunk: 256 MiB in fp32 (twice that while a chunk's softmax is formed)


def causal_lm_loss(hidden, head_weight, labels=None, num_items_in_batch=None, shift_labels=None):
    """The loss transformers' ForCausalLMLoss computes (next-token targets, -100 ignored, fp32 logits; a sum
    over num_items_in_batch when given, else the mean over this rank's targets) from the final hidden states
    and the LM head's weight, whole or an FSDP2 shard."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    targets = shift_labels.reshape(-1).to(h.device)
    weight, start, group = vocabulary_slice(head_weight)
    if num_items_in_batch is None:
        denominator = (targets != IGNORE_INDEX).sum()
    elif torch.is_tensor(num_items_in_batch):
        denominator = num_items_in_batch.to(h.device)
    else:
        denominator = torch.tensor(num_items_in_batch, device=h.device)
    return HeadCrossEntropy.apply(h, weight, targets, start, group, denominator)


def vocabulary_slice(weight):
    """(this rank's rows of the LM head, the first row's vocabulary id, the group; None when the head is
    whole)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(weight, DTensor):
        return weight, 0, None
    if weight.device_mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError(
            f"the sharded-head loss needs the LM head sharded by rows over one mesh dimension, got "
            f"{weight.placements} on a {weight.device_mesh.ndim}-D mesh; use a 1-D FSDP mesh."
        )
    group = weight.device_mesh.get_group()
    local = weight.to_local()
    # FSDP2 splits dim 0 as torch.chunk does: ceil(V / world) rows per rank, the last ranks get fewer
    vocab, world, rank = weight.shape[0], dist.get_world_size(group), dist.get_rank(group)
    start = min(rank * math.ceil(vocab / world), vocab)
    if local.shape[0] != min(math.ceil(vocab / world), vocab - start):
        raise RuntimeError(
            f"the LM head's shard has {local.shape[0]} rows, not the torch.chunk share of {vocab}"
        )
    return local, start, group


class HeadCrossEntropy(torch.autograd.Function):
    """This rank's token losses (-100 targets skipped) over the vocabulary slices of all ranks, summed and
    divided by `denominator` (a tensor: this rank's, which may differ between ranks)."""

    @staticmethod
    def forward(ctx, h, weight, targets, start: int, group, denominator):
        world = dist.get_world_size(group) if group is not None else 1
        n = h.shape[0]
        scale = 1 / denominator.reshape(1).float()
        if (
            world > 1
        ):  # every rank's tokens, padded to the longest rank's count, and each rank's 1 / denominator
            counts = [torch.zeros((), dtype=torch.long, device=h.device) for _ in range(world)]
            dist.all_gather(counts, torch.tensor(n, device=h.device), group=group)
            longest = max(int(c) for c in counts)
            offset = dist.get_rank(group) * longest
            h_all = padded_gather(h, longest, 0, group)
            t_all = padded_gather(targets, longest, IGNORE_INDEX, group)
            scales = padded_gather(scale, 1, 0, group).repeat_interleave(longest)
        else:
            offset, h_all, t_all, scales = 0, h, targets, scale.expand(n)
        rows = weight.shape[0]
        local_t = t_all - start
        in_slice = (local_t >= 0) & (local_t < rows)
        local_t = local_t.clamp(0, rows - 1).unsqueeze(1)
        valid = t_all != IGNORE_INDEX
        chunk = max(1, CHUNK_ELEMENTS // rows)
        spans = [slice(i, i + chunk) for i in range(0, h_all.shape[0], chunk)]

        def logits(span):
            return torch.mm(h_all[span], weight.t()).float()

        # pass 1: per token the slice's max, sum of exp and target logit, combined across the slices
        maxima = torch.empty(h_all.shape[0], device=h.device)
        sums = torch.empty_like(maxima)
        target_logit = torch.empty_like(maxima)
        for span in spans:
            z = logits(span)
            target_logit[span] = z.gather(1, local_t[span]).squeeze(1)
            maxima[span] = z.amax(1)
            sums[span] = z.sub_(maxima[span].unsqueeze(1)).exp_().sum(1)
        target_logit.mul_(in_slice)
        if world > 1:
            top = maxima.clone()
            dist.all_reduce(top, dist.ReduceOp.MAX, group=group)
            sums.mul_((maxima - top).exp_())
            dist.all_reduce(sums, group=group)
            dist.all_reduce(target_logit, group=group)
            maxima = top
        log_sums = sums.log_()
        # pass 2: d(loss)/d(hidden) = scale * (softmax - one-hot) . W over the slice; the slices' parts add up
        grad = torch.empty(h_all.shape, dtype=torch.float32 if world > 1 else h.dtype, device=h.device)
        token_weight = valid * scales
        for span in spans:
            p = logits(span).sub_(maxima[span].unsqueeze(1)).sub_(log_sums[span].unsqueeze(1)).exp_()
            rows_in = in_slice[span].nonzero().squeeze(1)
            p[rows_in, local_t[span][rows_in, 0]] -= 1
            p.mul_(token_weight[span].unsqueeze(1))
            grad[span] = torch.mm(p.to(weight.dtype), weight)
        if world > 1:
            dist.all_reduce(grad, group=group)
        ctx.save_for_backward(grad[offset : offset + n].to(h.dtype))
        own = slice(offset, offset + n)
        token_loss = (maxima[own] + log_sums[own] - target_logit[own]) * valid[own]
        return token_loss.sum() / denominator.float()

    @staticmethod
    def backward(ctx, grad_output):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_output.to(grad_h.dtype), None, None, None, None, None


def padded_gather(x, length: int, fill, group):
    """x from every rank, each padded with `fill` to `length` rows, concatenated in rank order."""
    padded = x.new_full((length, *x.shape[1:]), fill)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, padded, group=group)
    return torch.cat(parts)


def use_sharded_head_loss(model) -> bool:
    """The causal LM's loss from causal_lm_loss instead of its LM head + loss function (under FSDP the LM
    head, its own FSDP unit, is then never gathered). Only for a frozen bias-free linear head; returns
    whether it applies. Calls without labels (generation) keep the LM head."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = causal_lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or head.weight.requires_grad:
        return False
    decoder = causal_lm.get_decoder()

    def forward(input_ids=None, labels=None, logits_to_keep=0, **kwargs):
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        out = decoder(input_ids=input_ids, **kwargs)
        hidden = out.last_hidden_state
        if labels is None and shift_labels is None:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits, loss = head(hidden[:, keep, :]), None
        else:
            logits, loss = None, causal_lm_loss(hidden, head.weight, labels, num_items_in_batch, shift_labels)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    causal_lm.forward = forward
    return True
