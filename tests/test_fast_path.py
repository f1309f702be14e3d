"""The GPU fast path's CPU-checkable parts: packing that keeps examples apart, recipe options,
batch_size=auto, the FLOPs count behind MFU. GPU-only checks are marked `gpu` and skip without CUDA."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qlora_lab.config import ConfigError, KbitPreparation, Kernels
from qlora_lab.data import (
    IGNORE_INDEX,
    PackedCollator,
    load_splits,
    mean_context,
    pack_examples,
    tokenize_split,
)
from qlora_lab.models import load_model, load_tokenizer, model_path, tokenizer_path
from qlora_lab.validation import validate

from .conftest import TINY, make_cfg

# The short fp32 train-stage run that the step-by-step comparisons below share (each adds what it compares)
SHORT_FP32_RUN = [
    "model=tiny_random",
    "model.dtype=float32",
    "train.precision=fp32",
    "dataset.size=8",
    "dataset.eval_size=4",
    "train.batch_size=2",
    "train.learning_rate=5e-3",
    "train.report_to=[]",
    "train.logging_steps=1",
    "train.eval_before=false",
]

# the train stage as on a GPU: packed varlen rows (cpu_varlen), fused 4-bit LoRA layers, checkpointing
PACKED_NF4_FUSED_RUN = [
    *SHORT_FP32_RUN,
    "quantization=nf4",
    "dataset.max_seq_length=128",
    "dataset.pack=true",
    "train.packed_attention=varlen",
    "train.max_steps=3",
    "train.gradient_checkpointing=true",
    "train.lora_layers=fused",
]


def test_pack_examples_fills_rows_in_order_without_splitting_examples():
    from datasets import Dataset

    ds = Dataset.from_dict(
        {
            "input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]],
            "labels": [[-100, 2, 3], [-100, 5], [-100, -100, 8, 9], [10]],
        }
    )
    rows = pack_examples(ds, 5)
    assert rows["input_ids"] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert rows["lengths"] == [[3, 2], [4, 1]]
    assert rows["labels"] == [[-100, 2, 3, -100, 5], [-100, -100, 8, 9, 10]]  # prompt masking kept
    batch = PackedCollator(pad_id=0)(list(rows))
    assert batch["input_ids"].shape == (1, 64) and "attention_mask" not in batch  # aligned to 64 tokens
    # restarts at every example; the alignment tokens continue the last example
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, *range(55)]]
    assert batch["input_ids"][0, 10:].tolist() == [0] * 54
    # the first token of each example is never a target: nothing is predicted across a boundary
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5, IGNORE_INDEX, -100, 8, 9, IGNORE_INDEX] + [IGNORE_INDEX] * 54
    ]
    assert mean_context(rows) == pytest.approx((6 + 3 + 10 + 1) / 10)
    # first fit: a short example fills the gap an earlier long one left open
    ds = Dataset.from_dict(
        {"input_ids": [[1, 2, 3], [4, 5, 6, 7], [8, 9]], "labels": [[1, 2, 3], [4, 5, 6, 7], [8, 9]]}
    )
    assert pack_examples(ds, 5)["lengths"] == [[3, 2], [4]]


def _per_example_losses(logits: torch.Tensor, labels: torch.Tensor, lengths: list[int]) -> list[float]:
    """Mean next-token loss of each example in one flat sequence (the HF shift: logits[i] predicts
    labels[i+1])."""
    losses, start = [], 0
    for n in lengths:
        lg, lb = logits[start : start + n - 1], labels[start + 1 : start + n]
        losses.append(torch.nn.functional.cross_entropy(lg.double(), lb, ignore_index=IGNORE_INDEX).item())
        start += n
    return losses


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_equal_unpacked_per_example(attn):
    cfg = make_cfg(
        [
            *TINY,
            "quantization=none",
            "dataset.pack=true",
            "dataset.max_seq_length=1024",
            f"model.attn_implementation={attn}",
        ]
    )
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    split = load_splits(cfg).train[:12]
    rows, _ = tokenize_split(split, tokenizer, cfg.dataset, "train")
    assert all(len(lengths) > 1 for lengths in rows["lengths"][:2])  # the rows really hold several examples
    torch.manual_seed(0)
    model = load_model(model_path(cfg), cfg).float().eval()
    batch = PackedCollator(tokenizer.pad_token_id)(list(rows.select(range(2))))
    lengths = [n for row in rows["lengths"][:2] for n in row]
    lengths[-1] = batch["input_ids"].shape[1] - sum(
        lengths[:-1]
    )  # the alignment tokens: part of the last example
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits[0]
        packed_losses = _per_example_losses(packed, batch["labels"][0], lengths)
        alone_losses, start = [], 0
        for n in lengths:
            ids = batch["input_ids"][:, start : start + n]
            logits = model(input_ids=ids).logits[0]
            alone_losses += _per_example_losses(logits, batch["labels"][0, start : start + n], [n])
            start += n
    assert len(packed_losses) == len(lengths) > 2
    assert packed_losses == pytest.approx(alone_losses, abs=1e-5)


def segment_sdpa(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """A CPU stand-in for torch's FlashAttention varlen kernel (CUDA only), same signature and layout
    ([tokens, heads, dim]): causal attention within each segment of cu_q."""
    assert window_size == (-1, 0) and enable_gqa and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    bounds = cu_q.tolist()
    # an upper bound on the segments' lengths, as FlashAttention takes it
    assert max_q == max_k >= max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    out = [
        torch.nn.functional.scaled_dot_product_attention(
            *(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True, scale=scale
        ).transpose(0, 1)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(out)


@pytest.fixture
def cpu_varlen(monkeypatch):
    """Route packed_attention=varlen to segment_sdpa on a CPU: the collator, the kwargs through the model and
    the attention plumbing run as on a GPU; only the kernel differs."""
    import qlora_lab.attention

    monkeypatch.setattr(qlora_lab.attention, "varlen_kernel", lambda: segment_sdpa)
    monkeypatch.setattr(qlora_lab.attention, "available", lambda dtype: True)


def test_varlen_packed_losses_equal_unpacked_per_example(cpu_varlen):
    from qlora_lab.attention import use_varlen

    cfg = make_cfg([*TINY, "quantization=none", "dataset.pack=true", "dataset.max_seq_length=1024"])
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    rows, _ = tokenize_split(load_splits(cfg).train[:12], tokenizer, cfg.dataset, "train")
    torch.manual_seed(0)
    model = load_model(model_path(cfg), cfg).float().eval()
    batch = PackedCollator(tokenizer.pad_token_id, varlen=True)(list(rows.select(range(2))))
    lengths = [n for row in rows["lengths"][:2] for n in row]
    assert batch["input_ids"].shape[1] == sum(lengths)  # no alignment tokens: every token is a real one
    assert batch["cu_seq_lens_q"].tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    with torch.no_grad():
        alone = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits[0]
        use_varlen(model)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        packed = model(**inputs, use_cache=False).logits[0]
    labels = batch["labels"][0]
    # sdpa's mask (the same boundaries) and varlen agree, and each example alone gives the same losses
    assert _per_example_losses(packed, labels, lengths) == pytest.approx(
        _per_example_losses(alone, labels, lengths), abs=1e-5
    )
    start, alone_losses = 0, []
    for n in lengths:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"][:, start : start + n]).logits[
                0
            ]  # no cu_seq_lens: sdpa
        alone_losses += _per_example_losses(logits, labels[start : start + n], [n])
        start += n
    assert _per_example_losses(packed, labels, lengths) == pytest.approx(alone_losses, abs=1e-5)


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (`.item()`, `bool(t)`): on a GPU, each one is a
    synchronize."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


def test_packed_varlen_forward_reads_nothing_on_the_host(cpu_varlen):
    """transformers searches the position ids for packed sequences before it builds a mask, and tests what it
    found on the host: under the varlen attention a packed batch's forward skips that search (no mask to
    build), so nothing in it waits for the GPU; a padded batch still gets its mask from sdpa."""
    from qlora_lab.attention import use_varlen

    cfg = make_cfg([*TINY, "quantization=none", "dataset.pack=true", "dataset.max_seq_length=256"])
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    rows, _ = tokenize_split(load_splits(cfg).train[:12], tokenizer, cfg.dataset, "train")
    model = load_model(model_path(cfg), cfg).float().eval()
    batch = PackedCollator(tokenizer.pad_token_id, varlen=True)(list(rows.select(range(2))))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        plain = HostReads()
        with plain:
            model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False)
        assert plain.count >= 1  # sdpa: the search and its test on the host
        use_varlen(model)
        reads = HostReads()
        with reads:
            model(**inputs, use_cache=False)
        assert reads.count == 0
        # two padded rows, the second half padding: its mask still keeps the first row's tokens to themselves
        ids = inputs["input_ids"][:, :16].repeat(2, 1)
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        padded = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        alone = model(input_ids=ids[1:, :8], use_cache=False).logits
    assert torch.allclose(padded[1, :8], alone[0], atol=1e-5)


def test_static_batches_pad_with_examples_that_change_no_loss(cpu_varlen):
    """train.cuda_graphs' collator: every batch gets one shape (tokens, boundaries, max length). The padding
    is examples of pad tokens labelled -100 and empty examples at the end, so every real token's logits are
    those of the unpadded batch, and the batch says how many tokens are padding."""
    from qlora_lab.attention import use_varlen

    cfg = make_cfg([*TINY, "quantization=none", "dataset.pack=true", "dataset.max_seq_length=256"])
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    rows, _ = tokenize_split(load_splits(cfg).train[:12], tokenizer, cfg.dataset, "train")
    most = max(len(lengths) for lengths in rows["lengths"])
    rows = list(rows.select(range(2)))
    plain = PackedCollator(tokenizer.pad_token_id, varlen=True)(rows)
    static = PackedCollator(tokenizer.pad_token_id, True, (3 * 256, 3 * (most + 1), 256))(rows)
    n = plain["input_ids"].shape[1]
    assert static["input_ids"].shape == (1, 768) and static[PackedCollator.PADDING_KEY] == 768 - n > 256
    assert static["cu_seq_lens_q"].shape == (3 * (most + 1) + 1,) and static["max_length_q"] == 256
    real = plain["cu_seq_lens_q"].tolist()
    bounds = static["cu_seq_lens_q"].tolist()
    pads = [b - a for a, b in zip(bounds[len(real) - 1 : -1], bounds[len(real) :], strict=True)]
    assert bounds[: len(real)] == real and bounds[-1] == 768 and 0 < max(pads) <= 256 and pads[-1] == 0
    assert torch.equal(static["input_ids"][:, :n], plain["input_ids"])
    assert (static["labels"][0, n:] == -100).all() and (
        static["input_ids"][0, n:] == tokenizer.pad_token_id
    ).all()
    torch.manual_seed(0)
    model = load_model(model_path(cfg), cfg).float().eval()
    use_varlen(model)
    with torch.no_grad():
        logits = [
            model(**{k: v for k, v in b.items() if k not in ("labels", PackedCollator.PADDING_KEY)}).logits[0]
            for b in (plain, static)
        ]
    assert torch.allclose(logits[1][:n], logits[0], atol=1e-5)


def _train(run_dir, overrides: list[str]):
    """The train stage in this process (so that monkeypatches apply); returns the Run and its per-step
    losses."""
    from qlora_lab.pipelines import train
    from qlora_lab.rundir import Run

    cfg = make_cfg(overrides)
    run_dir.mkdir()
    run = Run(dir=run_dir, source=run_dir)
    run.start(cfg)
    train.run(cfg, run)
    run.finish()
    last = max((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    return run, [h["loss"] for h in state["log_history"] if "loss" in h]


def test_varlen_training_steps_equal_masked_ones(cpu_varlen, tmp_path):
    """The whole train stage with packed_attention=varlen (gradient checkpointing on, so the boundaries must
    also reach the recomputed layers) gives the same per-step losses as the masked packing, and counts every
    token."""
    results = {}
    for mode in ("mask", "varlen"):
        run, losses = _train(
            tmp_path / mode,
            [
                *SHORT_FP32_RUN,
                "quantization=none",
                "dataset.max_seq_length=768",
                "dataset.pack=true",
                "train.max_steps=2",
                "train.gradient_checkpointing=true",
                "lora.dropout=0",
                f"train.packed_attention={mode}",
            ],
        )  # dropout draws per token: off
        assert run.metrics["data/train_rows"] in (3, 4) and len(losses) == 2  # 2 steps of 2 rows see them all
        results[mode] = losses, run.metrics["train/tokens_seen"], run.metrics["data/train_tokens"]
    (mask_losses, mask_seen, tokens), (varlen_losses, varlen_seen, _) = results["mask"], results["varlen"]
    assert varlen_losses == pytest.approx(mask_losses, abs=1e-5)
    assert varlen_seen == tokens  # every real token of every row counted
    assert varlen_seen > mask_seen  # the masked count leaves out EOS, SmolLM2's pad token


def adapted_model(cfg):
    """cfg's model with its LoRA adapter, in training mode, B drawn from N(0, 0.05) instead of zeros (so that
    the adapter contributes), seed 0, no KV cache."""
    from qlora_lab.models import attach_lora

    torch.manual_seed(0)
    model = attach_lora(load_model(model_path(cfg), cfg), cfg)
    model.config.use_cache = False
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model.train()


@pytest.mark.parametrize("quantization, dropout", [("nf4", 0.0), ("none", 0.0), ("nf4", 0.1)])
def test_fused_lora_layers_compute_what_peft_does(quantization, dropout):
    """The fused LoRA layer (qlora_lab/fused_lora.py) against PEFT's modules on the same weights: same loss,
    same adapter gradients (fp32 on a CPU); calls it does not cover (adapter disabled) still take PEFT's
    path."""
    from qlora_lab.fused_lora import fuse_lora

    cfg = make_cfg(
        [
            "model=tiny_random",
            f"quantization={quantization}",
            "model.dtype=float32",
            f"lora.dropout={dropout}",
            "train.gradient_checkpointing=true",
        ]
    )
    model = adapted_model(cfg)
    ids = torch.randint(3, 1000, (2, 24))

    def step():
        model.zero_grad()
        torch.manual_seed(
            1
        )  # the same dropout masks: both draw them from the same generator, in the same order
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    peft_loss, peft_grads = step()
    for keep_weight in (False, True):  # dequantize again in the backward, or keep the forward's weight
        assert fuse_lora(model, keep_weight) == 2 * 7  # every linear of both layers
        fused_loss, fused_grads = step()
        assert fused_loss == pytest.approx(peft_loss, abs=1e-6)
        for name, grad in peft_grads.items():
            assert torch.allclose(fused_grads[name], grad, rtol=1e-4, atol=1e-7), name
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids, labels=ids).loss.item()
    assert base != pytest.approx(fused_loss, abs=1e-4)  # PEFT's path without the adapter


def test_fused_lora_layer_answers_in_the_input_dtype():
    """A 4-bit base computing in bf16 under an fp32 model: bitsandbytes hands back fp32, and so must the fused
    layer (a bf16 output would turn the residual stream's adds into mixed-dtype ones)."""
    from qlora_lab.fused_lora import fuse_lora
    from qlora_lab.models import attach_lora

    cfg = make_cfg(
        [
            "model=tiny_random",
            "quantization=nf4",
            "model.dtype=float32",
            "quantization.compute_dtype=bfloat16",
        ]
    )
    torch.manual_seed(0)
    model = attach_lora(load_model(model_path(cfg), cfg), cfg).train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    with torch.no_grad():
        layer.lora_dropout["default"].p = 0.0
    expected = layer(x)
    fuse_lora(model)
    got = layer(x)
    assert got.dtype == expected.dtype == torch.float32
    assert torch.allclose(
        got, expected, rtol=2e-2, atol=2e-2
    )  # the adapter runs in bf16 here, in fp32 in PEFT's
    got.sum().backward()
    assert x.grad.dtype == torch.float32


def test_fused_lora_training_steps_equal_peft_ones(tmp_path):
    losses = {}
    for mode in ("peft", "fused"):
        losses[mode] = _train(
            tmp_path / mode,
            [
                *SHORT_FP32_RUN,
                "quantization=nf4",
                "dataset.max_seq_length=96",
                "train.max_steps=3",
                f"train.lora_layers={mode}",
            ],
        )[1]  # lora.dropout 0.05
    assert len(losses["fused"]) == 3 and losses["fused"] == pytest.approx(losses["peft"], abs=1e-5)


@pytest.mark.parametrize(
    "quantization, double_quant, dropout",
    [
        ("nf4", True, 0.0),
        ("nf4", False, 0.0),
        ("fp4", True, 0.0),
        ("fp4", False, 0.0),
        ("none", None, 0.0),
        ("nf4", True, 0.1),
    ],
)
def test_grouped_projections_compute_what_fused_and_peft_layers_do(
    quantization, double_quant, dropout, monkeypatch
):
    """q/k/v and gate/up as one node each, one dequantization per group (qlora_lab/fused_lora.py
    ProjectionGroup), against the per-layer fused path and PEFT's modules on the same weights: same loss and
    adapter gradients, with and without gradient checkpointing, in fp32 on a CPU. Not bit-identical: the
    concatenated A matmul and the summed input gradient add in another order (differences ~1e-8)."""
    from qlora_lab import fused_lora

    cfg = make_cfg(
        [
            "model=tiny_random",
            f"quantization={quantization}",
            "model.dtype=float32",
            f"lora.dropout={dropout}",
            *([f"quantization.double_quant={double_quant}"] if double_quant is not None else []),
        ]
    )
    model = adapted_model(cfg)
    ids = torch.randint(3, 1000, (2, 24), device=model.device)  # on CUDA too (gpu.sh step24 runs this test)
    calls = {"group": 0, "layer": 0}
    group_weight, layer_forward = fused_lora.ProjectionGroup.base_weight, fused_lora.LoRALinear.forward

    def count(kind, fn):
        def counted(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)

        return counted

    monkeypatch.setattr(fused_lora.ProjectionGroup, "base_weight", count("group", group_weight))
    monkeypatch.setattr(fused_lora.LoRALinear, "forward", staticmethod(count("layer", layer_forward)))

    def step():
        model.zero_grad()
        calls.update(group=0, layer=0)
        torch.manual_seed(1)  # the same dropout masks, drawn in the same order
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    peft_loss, peft_grads = step()
    with torch.no_grad():
        peft_eval = model.eval()(input_ids=ids, labels=ids).loss.item()  # no dropout
    model.train()
    assert fused_lora.fuse_lora(model) == 2 * 7
    fused_loss, fused_grads = step()
    assert calls == {"group": 0, "layer": 14}
    qkv = model.base_model.model.model.layers[0].self_attn
    weights_before = [getattr(qkv, n).base_layer.weight.data.clone() for n in ("q_proj", "k_proj", "v_proj")]
    assert fused_lora.group_projections(model) == 2 * 2  # q/k/v and gate/up in both decoder layers
    # the modules' own weights are now views of the group's buffer, with the same contents
    group = qkv.q_proj._lora_group
    for name, before in zip(("q_proj", "k_proj", "v_proj"), weights_before, strict=True):
        weight = getattr(qkv, name).base_layer.weight
        assert weight.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()
        assert torch.equal(weight.data.view(torch.uint8), before.view(torch.uint8))  # the same bits
    quantized = quantization != "none"
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        grouped_loss, grouped_grads = step()
        # o_proj and down_proj stay per layer; each group dequantizes once in the forward, again in the
        # recomputation, and once in the backward, except the first layer's q/k/v without checkpointing (its
        # input, the embedding's output, needs no gradient)
        assert calls == {"group": 12 if checkpointing else 7, "layer": 8 if checkpointing else 4}
        assert all(
            m._lora_group.pending is None
            for m in fused_lora.fusable_layers(model)
            if hasattr(m, "_lora_group")
        )
        assert grouped_loss == pytest.approx(fused_loss, abs=1e-6)
        assert grouped_loss == pytest.approx(peft_loss, abs=1e-6)
        for name, grad in peft_grads.items():
            assert torch.allclose(grouped_grads[name], fused_grads[name], rtol=1e-5, atol=1e-7), name
            assert torch.allclose(grouped_grads[name], grad, rtol=1e-4, atol=1e-7), name
    assert quantized == (group.quant_state is not None)
    # eval under no_grad: the group again; a call it does not cover (adapter off) takes PEFT's path
    model.eval()
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).loss.item() == pytest.approx(peft_eval, abs=1e-6)
        with model.disable_adapter():
            base = model(input_ids=ids, labels=ids).loss.item()
    assert base != pytest.approx(peft_eval, abs=1e-4)


def test_grouped_projections_compute_in_bf16_and_answer_in_the_input_dtype():
    """The GPU's case on a CPU: a 4-bit base computing in bf16, fp32 adapters. q/k/v through the group give
    the per-layer fused layers' outputs and adapter gradients (measured: identical), in the input's dtype;
    the input's gradient within one bf16 rounding (measured 0.35% of its largest entry): the group adds the
    three projections' terms in bf16 matmuls, the per-layer path in fp32 (autograd's sum, fp32 input)."""
    from qlora_lab.fused_lora import fuse_lora, group_projections
    from qlora_lab.models import attach_lora

    cfg = make_cfg(
        [
            "model=tiny_random",
            "quantization=nf4",
            "model.dtype=float32",
            "quantization.compute_dtype=bfloat16",
            "lora.dropout=0",
        ]
    )
    torch.manual_seed(0)
    model = attach_lora(load_model(model_path(cfg), cfg), cfg).train()
    attn = model.base_model.model.model.layers[0].self_attn
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    x = torch.randn(2, 5, attn.q_proj.in_features).to(attn.q_proj.lora_A["default"].weight.device)

    def run():
        xi = x.clone().requires_grad_()
        outs = [layer(xi) for layer in layers]
        sum((o * torch.linspace(-1, 1, o.shape[-1], device=o.device)).sum() for o in outs).backward()
        grads = [
            p.grad.clone()
            for layer in layers
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
        ]
        model.zero_grad()
        return outs, xi.grad, grads

    fuse_lora(model)
    per_layer = run()
    assert group_projections(model) == 4
    grouped = run()
    for got, expected in zip(
        [*grouped[0], grouped[1], *grouped[2]], [*per_layer[0], per_layer[1], *per_layer[2]], strict=True
    ):
        assert got.dtype == expected.dtype == torch.float32
        assert torch.allclose(got, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


@pytest.mark.parametrize("quantization, dropout", [("nf4", 0.0), ("none", 0.0), ("nf4", 0.1)])
def test_swiglu_and_down_projection_as_one_node_save_less_and_compute_the_same(quantization, dropout):
    """down_proj(silu(gate) * up) as one node (fused_lora.SwiGLULoRALinear) against the MLP's SwiGLU and the
    fused down projection: the same loss and adapter gradients to the bit, in fp32 on a CPU (torch's SwiGLU,
    as without Liger), and the product is no longer saved: 2 tensors of tokens x intermediate size less per
    layer (torch's SwiGLU saves gate, silu(gate) and up; the node saves gate and up). With dropout the down
    projection's mask has to be kept, so the MLP stays as it was."""
    from qlora_lab.fused_lora import fuse_lora, fuse_swiglu_down, group_projections

    cfg = make_cfg(["model=tiny_random", f"quantization={quantization}", "model.dtype=float32"])
    model = adapted_model(cfg)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
    fuse_lora(model), group_projections(model)
    ids = torch.randint(3, 1000, (2, 24))

    def step():
        model.zero_grad()
        saved = []
        torch.manual_seed(1)  # the same dropout masks
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.item(), grads, sum(saved)

    loss, grads, saved = step()
    assert fuse_swiglu_down(model, liger=False) == 2
    fused_loss, fused_grads, fused_saved = step()
    assert fused_loss == loss
    assert all(torch.equal(fused_grads[n], g) for n, g in grads.items())
    product = ids.numel() * model.config.intermediate_size
    assert saved - fused_saved == (0 if dropout else 2 * 2 * product)  # 2 layers


def test_uncheckpointed_layers_compute_their_norm_outputs_again_in_the_backward():
    """A decoder layer that keeps its activations saves its norms' inputs, not their outputs, which the
    backward computes again (qlora_lab/recomputed_norms.py): the same loss and adapter gradients to the bit,
    with the 2 norm outputs of each layer (saved by the q/k/v and gate/up groups) computed again; a
    checkpointed layer is left as it is."""
    from qlora_lab.fused_lora import fuse_lora, group_projections
    from qlora_lab.models import checkpointing_layers
    from qlora_lab.recomputed_norms import recompute_norms

    overrides = ["model=tiny_random", "quantization=nf4", "model.dtype=float32", "lora.dropout=0"]
    cfg = make_cfg([*overrides, "train.gradient_checkpointing=true", "train.uncheckpointed_layers=1"])
    model = adapted_model(cfg)
    fuse_lora(model), group_projections(model)
    ids = torch.randint(3, 1000, (2, 24))

    def step():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = step()
    hooks = recompute_norms(checkpointing_layers(model))
    assert len(hooks) == 1  # the last layer; the first is checkpointed
    again_loss, again_grads = step()
    assert again_loss == loss
    assert all(torch.equal(again_grads[n], g) for n, g in grads.items())
    assert hooks[0].recomputed == 2 and not hooks[0].outputs


def test_projections_that_cannot_share_one_buffer_stay_per_layer():
    """Weights quantized differently (here another blocksize: blocks would straddle the weights' boundaries
    in a shared buffer) are not grouped; their siblings elsewhere still are."""
    from qlora_lab.fused_lora import fuse_lora, group_projections
    from qlora_lab.models import attach_lora

    cfg = make_cfg(["model=tiny_random", "quantization=nf4", "model.dtype=float32"])
    model = attach_lora(load_model(model_path(cfg), cfg), cfg)
    fuse_lora(model)
    attn = model.base_model.model.model.layers[0].self_attn
    attn.k_proj.base_layer.weight.quant_state.blocksize *= 2
    assert group_projections(model) == 3  # layer 0's gate/up, layer 1's q/k/v and gate/up
    assert not any(hasattr(getattr(attn, n), "_lora_group") for n in ("q_proj", "k_proj", "v_proj"))


def test_grouped_projection_training_steps_equal_per_layer_ones(cpu_varlen, tmp_path, capsys):
    """The train stage as on a GPU (packed rows through the varlen path, gradient checkpointing on, so the
    backward keeps the group's dequantized weight): the same per-step losses with group_projections off and
    on; the log says how many groups were formed."""
    losses = {}
    for mode in ("off", "on"):
        losses[mode] = _train(
            tmp_path / mode,
            [
                *PACKED_NF4_FUSED_RUN,
                f"train.group_projections={mode}",
            ],
        )[1]  # lora.dropout 0.05
        printed = capsys.readouterr().out
        assert (
            "attention varlen" in printed
            and f"LoRA layers fused (14, {4 if mode == 'on' else 0} groups, 2 with their SwiGLU)" in printed
        )
    assert len(losses["on"]) == 3 and losses["on"] == pytest.approx(losses["off"], abs=1e-5)


class ReplayedPass:
    """The CPU stand-in for a captured CUDA graph: replaying runs the captured pass again on the same
    buffers, as a graph replays its kernels on the addresses it captured."""

    def __init__(self, run):
        self.replay = run


@pytest.fixture
def cpu_graphs(monkeypatch, cpu_varlen):
    """train.cuda_graphs on a CPU: everything but the capture itself (the dispatch, the static batches, the
    buffers the passes share, the gradients through autograd) runs as on a GPU."""
    import qlora_lab.layer_graphs as graphs

    monkeypatch.setattr(graphs, "gpu_available", lambda: True)
    monkeypatch.setattr(graphs, "on_gpu", lambda t: True)
    monkeypatch.setattr(graphs, "warm_up", lambda pool, *passes: [run() for run in passes])
    monkeypatch.setattr(graphs, "pool_bytes", lambda pool: 3 * 2**29)
    monkeypatch.setattr(graphs, "new_pool", lambda: None)
    monkeypatch.setattr(graphs, "record", lambda run, pool: ReplayedPass(run))
    monkeypatch.setattr(graphs, "release_cached", lambda: None)
    # train.activation_offload: "host memory" is another CPU tensor, each copy done when it is issued
    monkeypatch.setattr(graphs, "new_copy_stream", lambda: "copy stream")
    monkeypatch.setattr(graphs, "pinned_like", lambda t: torch.full_like(t, float("nan")))
    monkeypatch.setattr(graphs, "device_of", lambda stream: torch.device("cpu"))
    monkeypatch.setattr(graphs, "copy_on", lambda stream, dst, src: dst.copy_(src))
    monkeypatch.setattr(graphs, "wait_for", lambda event: None)


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (["train.lora_layers=peft"], "the LoRA layers are not fused (train.lora_layers=peft)"),
        (
            ["train.lora_layers=fused", "train.packed_attention=mask"],
            "packed rows do not use the varlen attention (train.packed_attention)",
        ),
    ],
)
def test_cuda_graphs_where_the_step_cannot_take_them_are_refused_up_front(cpu_graphs, overrides, reason):
    with pytest.raises(ConfigError) as error:
        validate(make_cfg([*GRAPHABLE, *overrides]))
    assert str(error.value) == (
        f"train.cuda_graphs=true cannot run here: {reason}; set train.cuda_graphs=false."
    )


def test_graphed_layers_train_as_eager_ones(cpu_graphs, tmp_path, capsys):
    """The train stage with train.cuda_graphs (nf4, fused and grouped LoRA layers, packed varlen rows,
    checkpointing): each layer captured once, replayed every step after, and the same per-step losses and
    tokens seen as the eager layers; evaluation stays eager."""
    runs = {}
    for name, extra in (
        ("eager", ["train.cuda_graphs=false"]),
        ("graphed", ["train.cuda_graphs=true"]),
        # the last layer keeps its activations and runs eagerly; the first is graphed
        ("last_uncheckpointed", ["train.cuda_graphs=true", "train.uncheckpointed_layers=1"]),
        # the first layer's input waits for its backward in host memory (the last one's is needed first)
        ("offloaded", ["train.cuda_graphs=true", "train.activation_offload=true"]),
    ):
        runs[name] = _train(tmp_path / name, [*PACKED_NF4_FUSED_RUN, "lora.dropout=0", *extra])
    (eager, eager_losses), (graphed, graphed_losses) = runs["eager"], runs["graphed"]
    printed = capsys.readouterr().out
    assert "gradient checkpointing on, CUDA graphs per decoder layer" in printed
    assert "gradient checkpointing on (not the last layer), CUDA graphs per decoder layer" in printed
    assert (
        graphed.metrics["train/cuda_graphs"] == "2 layers captured, 6 replays, pool 1.50 GiB"
    )  # 3 steps x 2 layers
    assert len(graphed_losses) == 3 and graphed_losses == pytest.approx(eager_losses, abs=1e-5)
    assert graphed.metrics["train/tokens_seen"] == eager.metrics["train/tokens_seen"]  # padding not counted
    assert graphed.metrics["eval/loss"] == pytest.approx(eager.metrics["eval/loss"], abs=1e-5)
    mixed, mixed_losses = runs["last_uncheckpointed"]
    assert mixed.metrics["train/cuda_graphs"] == "1 layers captured, 3 replays, pool 1.50 GiB"
    assert mixed_losses == pytest.approx(eager_losses, abs=1e-5)
    offloaded, offloaded_losses = runs["offloaded"]
    assert offloaded.metrics["train/cuda_graphs"] == (
        "2 layers captured, 6 replays, pool 1.50 GiB, 1 layer inputs kept in host memory"
    )
    assert offloaded_losses == pytest.approx(eager_losses, abs=1e-5)


# the 2-layer model with an LM head of its own (tiny_random ties it to the input embedding)
UNTIED = "model.random_init.tie_word_embeddings=false"


def test_embedding_on_host_trains_as_on_the_device(cpu_graphs, tmp_path, monkeypatch, capsys):
    """train.embedding_on_host with the rest of the 8B settings (graphs, offload, an uncheckpointed layer):
    the same per-step losses, tokens seen and eval loss as with the table on the device; every train batch's
    rows come from the host table, and after training the table is back (the final evaluation looks nothing
    up)."""
    from qlora_lab.host_embedding import HostEmbedding

    lookups = []
    rows = HostEmbedding.rows
    monkeypatch.setattr(HostEmbedding, "rows", lambda self, ids: lookups.append(ids.shape) or rows(self, ids))
    settings = [
        *PACKED_NF4_FUSED_RUN,
        "lora.dropout=0",
        UNTIED,
        "train.cuda_graphs=true",
        "train.activation_offload=true",
        "train.uncheckpointed_layers=1",
    ]
    (device, device_losses), (host, host_losses) = (
        _train(tmp_path / name, [*settings, f"train.embedding_on_host={on}"])
        for name, on in (("device", "false"), ("host", "true"))
    )
    assert "CUDA graphs per decoder layer, input embedding in host memory" in capsys.readouterr().out
    assert len(host_losses) == 3 and host_losses == device_losses
    assert host.metrics["train/tokens_seen"] == device.metrics["train/tokens_seen"]
    assert host.metrics["eval/loss"] == device.metrics["eval/loss"]
    # the 3 static train batches (and one the data loader fetched ahead); none from the final evaluation,
    # whose batches have other shapes
    assert len(lookups) >= 3 and set(lookups) == {torch.Size([1, 256])}


def test_embedding_on_host_where_it_cannot_work_is_one_sentence(tmp_path, monkeypatch):
    """A model whose LM head shares the table is refused before training (the head needs it on the GPU);
    so is a distributed run, before any model loads."""
    with pytest.raises(ConfigError) as error:
        _train(tmp_path / "tied", [*SHORT_FP32_RUN, "train.max_steps=1", "train.embedding_on_host=true"])
    assert str(error.value) == (
        "train.embedding_on_host=true cannot be used here: the model ties its input embedding to the LM "
        "head, which needs the table on the GPU; set it to false."
    )
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"^train\.embedding_on_host=true is tried on one process only"):
        validate(make_cfg(["train.embedding_on_host=true"]))


def test_offloaded_layer_inputs_come_back_in_order(cpu_graphs):
    """HostCopies over three steps of a 4-layer forward and backward: each backward gets back the input its
    forward saved (the host buffers reused step after step), the next one fetched during it."""
    from qlora_lab.layer_graphs import HostCopies

    host = HostCopies()
    for step in range(3):
        inputs = {i: torch.full((2, 3), 10.0 * step + i) for i in range(3)}  # layers 0-2; 3 keeps its own
        for i, hidden in inputs.items():
            host.save(i, hidden)
        host.fetch(2)  # as layer 3's backward does
        for i in (2, 1, 0):
            assert set(host.back) == {i}  # only the layer whose backward comes next is on its way back
            assert torch.equal(host.take(i), inputs[i])
            if i:
                host.fetch(i - 1)
        assert len(host.host) == 3 and not host.back
    # a step that stopped before its backward took what it fetched
    host.save(0, torch.ones(2, 3)), host.fetch(0), host.save(0, torch.zeros(2, 3))
    assert torch.equal(host.take(0), torch.zeros(2, 3))


def test_uncheckpointed_layers_are_the_last_and_keep_no_dequantized_weight():
    """train.uncheckpointed_layers=1 on the 2-layer nf4 model: layer 1 keeps its activations, so its fused
    and grouped LoRA layers dequantize again in the backward rather than hold a bf16 weight from forward to
    backward; layer 0 stays checkpointed and keeps its weight from recomputation to backward."""
    from qlora_lab.fused_lora import fuse_lora, group_projections, keep_no_weight_unless_checkpointed
    from qlora_lab.models import attach_lora, checkpointing_layers

    overrides = ["model=tiny_random", "quantization=nf4", "train.gradient_checkpointing=true"]
    cfg = make_cfg([*overrides, "train.uncheckpointed_layers=1"])
    model = attach_lora(load_model(model_path(cfg), cfg), cfg)
    fuse_lora(model, keep_weight=True), group_projections(model, keep_weight=True)
    layers = checkpointing_layers(model)
    keep_no_weight_unless_checkpointed(layers)
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    for layer, keeps in zip(layers, (True, False), strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.o_proj._keep_weight is mlp.down_proj._keep_weight is keeps  # per-layer fused
        assert attn.q_proj._lora_group.keep_weight is mlp.gate_proj._lora_group.keep_weight is keeps
    with pytest.raises(
        ConfigError, match=r"^train\.uncheckpointed_layers=3 but the model has 2 decoder layers"
    ):
        attach_lora(load_model(model_path(cfg), cfg), make_cfg([*overrides, "train.uncheckpointed_layers=3"]))


def test_recipes_compose_and_validate():
    fast, paper = make_cfg([]), make_cfg(["recipe=paper"])
    validate(fast), validate(paper)
    assert (fast.recipe, paper.recipe) == ("fast", "paper")
    assert fast.quantization.preparation is KbitPreparation.keep_dtype
    assert paper.quantization.preparation is KbitPreparation.fp32_upcast
    assert (fast.train.optim, paper.train.optim) == ("auto", "adamw_torch")
    assert (fast.train.kernels, paper.train.kernels) == (Kernels.auto, Kernels.none)
    assert (fast.train.autocast, paper.train.autocast) == (False, True)
    assert (
        fast.lora == paper.lora and fast.train.learning_rate == paper.train.learning_rate
    )  # no hyperparameters
    # a command-line value still wins over the recipe
    assert make_cfg(["recipe=paper", "train.optim=adamw_torch_fused"]).train.optim == "adamw_torch_fused"


GRAPHABLE = [
    "train.cuda_graphs=true",
    "train.gradient_checkpointing=true",
    "dataset.pack=true",
    "lora.dropout=0",
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_cuda_graphs_on_a_cpu_is_one_sentence():
    with pytest.raises(
        ConfigError, match=r"^train\.cuda_graphs=true needs a CUDA GPU; set train\.cuda_graphs=false\.$"
    ):
        validate(make_cfg(GRAPHABLE))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_activation_offload_on_a_cpu_is_one_sentence():
    with pytest.raises(
        ConfigError,
        match=r"^train\.activation_offload moves activations from a GPU .*no CUDA GPU; "
        r"set train\.activation_offload=false\.$",
    ):
        validate(make_cfg(["train.gradient_checkpointing=true", "train.activation_offload=true"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU / no-package message")
def test_liger_requested_where_it_cannot_run_is_one_sentence():
    with pytest.raises(ConfigError, match=r"^train\.kernels=liger needs .*train\.kernels=auto"):
        validate(make_cfg(["train.kernels=liger"]))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["train.batch_size=0"], "train.batch_size"),
        (["train.batch_size=biggest"], "train.batch_size"),
        (["train.checkpoint_every_n_layers=0"], "train.checkpoint_every_n_layers"),
        (["train.activation_offload=true"], "train.activation_offload"),
        (["train.packed_attention=varlen", "dataset.pack=false"], "train.packed_attention"),
        (["train.packed_attention=varlen"], "train.packed_attention"),
        (["train.lora_layers=fused", "recipe=paper"], "train.autocast"),
        (["train.lora_layers=fused", "quantization=int8"], "quantization=int8"),
        (["train.group_projections=on"], "train.group_projections"),  # on a CPU: LoRA layers not fused
        (["train.cuda_graphs=true"], "train.gradient_checkpointing=true"),
        (["train.cuda_graphs=true", "train.gradient_checkpointing=true"], "dataset.pack=true"),
        (
            ["train.cuda_graphs=true", "train.gradient_checkpointing=true", "dataset.pack=true"],
            "lora.dropout=0",
        ),
        (
            [*GRAPHABLE, "train.checkpoint_every_n_layers=2"],
            "train.checkpoint_every_n_layers=1",
        ),
        ([*GRAPHABLE, "train.batch_size=auto"], "train.batch_size"),
        (["train.uncheckpointed_layers=-1"], "must be 0 or a positive number"),
        (["train.uncheckpointed_layers=2"], "needs train.gradient_checkpointing=true"),
        (
            [
                "train.gradient_checkpointing=true",
                "train.uncheckpointed_layers=2",
                "train.checkpoint_every_n_layers=2",
            ],
            "keep one of them",
        ),
    ],
)
def test_fast_path_options_are_checked(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(make_cfg(overrides))


def test_llama3_8b_matmul_weights_and_flops_per_token():
    from transformers import AutoConfig

    from qlora_lab.perf import flops_per_token, matmul_params

    spec = dict(make_cfg(["model=llama3_8b_random"]).model.random_init)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    # Llama-3-8B: 8,030,261,248 parameters, less the embedding (a lookup) and 65 RMSNorm weights of 4,096
    assert matmul_params(config) == 8_030_261_248 - 128_256 * 4_096 - 65 * 4_096 == 7_504_658_432
    assert flops_per_token(config, 0, 100.0) == 4 * 7_504_658_432 + 12 * 32 * 4096 * 100


@pytest.mark.slow
def test_batch_size_auto_and_speed_figures_on_cpu(tmp_path):
    from .conftest import run_main

    out = run_main(
        *TINY,
        "quantization=none",
        "dataset.pack=true",
        "train.batch_size=auto",
        "train.max_steps=3",
        "train.speed_skip_steps=0",
        "train.eval_before=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train/batch_size"] == 64  # nothing runs out of memory on a CPU: the first size tried
    assert (
        metrics["train/step_time_min_s"]
        <= metrics["train/step_time_median_s"]
        <= metrics["train/step_time_max_s"]
    )
    assert metrics["train/timed_steps"] == 3 and metrics["perf/flops_per_token"] > 0
    assert "perf/mfu" not in metrics  # no peak figure for a CPU
    assert "recipe fast: attention sdpa" in out.stdout and "kernels transformers" in out.stdout
    assert len(metrics["train/step_times_s"]) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_give_the_eager_steps(tmp_path):
    """train.cuda_graphs on the tiny model, fast recipe (nf4, packed varlen rows, checkpointing, grouped
    projections): every layer captured and replayed, the same per-step losses and tokens seen as eager."""
    runs = {}
    for name, extra in (
        ("eager", ["train.cuda_graphs=false"]),
        ("graphed", ["train.cuda_graphs=true"]),
        ("offloaded", ["train.cuda_graphs=true", "train.activation_offload=true"]),
    ):
        runs[name] = _train(
            tmp_path / name,
            [
                *TINY,
                "quantization=nf4",
                "dataset.pack=true",
                "dataset.max_seq_length=256",
                "train.max_steps=4",
                "train.gradient_checkpointing=true",
                "lora.dropout=0",
                *extra,
            ],
        )
    (eager, eager_losses), (graphed, graphed_losses) = runs["eager"], runs["graphed"]
    assert graphed.metrics["train/cuda_graphs"].startswith("2 layers captured")
    assert graphed_losses == pytest.approx(eager_losses, rel=2e-3) and len(graphed_losses) == 4
    assert graphed.metrics["train/tokens_seen"] == eager.metrics["train/tokens_seen"]
    # the copies to the host and back on their own stream: the graphed losses exactly
    offloaded, offloaded_losses = runs["offloaded"]
    assert offloaded.metrics["train/cuda_graphs"].endswith("1 layer inputs kept in host memory")
    assert offloaded_losses == graphed_losses


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_recipe_on_cuda_uses_liger_and_fused_adamw(tmp_path):
    from .conftest import cli

    pytest.importorskip("liger_kernel")
    out = cli(
        *TINY, "quantization=nf4", "dataset.pack=true", "train.max_steps=3", f"hydra.run.dir={tmp_path / 'r'}"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "optimizer adamw_torch_fused" in out.stdout
    assert "kernels Liger" in out.stdout
    assert (
        "attention varlen" in out.stdout
        and "LoRA layers fused (14, 4 groups, 2 with their SwiGLU)" in out.stdout
    )
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert 0 < metrics["perf/mfu"] < 1 and metrics["memory/peak_reserved_gib"] >= metrics["memory/peak_gib"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_swiglu_node_and_host_embedding_give_the_same_steps_on_cuda(tmp_path, monkeypatch):
    """The 8B run's settings on the tiny model (Liger's SwiGLU, graphs, offload, an uncheckpointed layer): the
    MLP's SwiGLU and down projection as one node and the embedding table on the host give the per-step losses
    of neither, to the bit. The node is in place over Liger's MLP, which the Trainer sets when training
    begins."""
    from qlora_lab import fused_lora
    from qlora_lab.pipelines import train

    settings = [
        *TINY,
        UNTIED,
        "quantization=nf4",
        "dataset.pack=true",
        "dataset.max_seq_length=256",
        "train.max_steps=4",
        "train.gradient_checkpointing=true",
        "lora.dropout=0",
        "train.cuda_graphs=true",
        "train.activation_offload=true",
        "train.uncheckpointed_layers=1",
    ]
    with monkeypatch.context() as patch:
        patch.setattr(train, "fuse_swiglu_down", lambda model, liger: 0)
        before, before_losses = _train(tmp_path / "before", settings)
    calls, forward = [], fused_lora.SwiGLULoRALinear.forward
    monkeypatch.setattr(
        fused_lora.SwiGLULoRALinear, "forward", staticmethod(lambda *a: calls.append(1) or forward(*a))
    )
    after, after_losses = _train(tmp_path / "after", [*settings, "train.embedding_on_host=true"])
    assert calls  # every MLP's forward went through the node
    assert len(after_losses) == 4 and after_losses == before_losses
    assert after.metrics["train/tokens_seen"] == before.metrics["train/tokens_seen"]
