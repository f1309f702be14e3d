"""CUDA graphs of the checkpointed decoder layers (train.cuda_graphs).

On one GPU the fast recipe's step is issued from Python kernel by kernel: on Llama-3-8B shapes (batch 2 x 2048
packed tokens, QLoRA nf4) ~6,000 kernels a step, 0.29 s of GPU work in a 0.5-0.6 s step (torch.profiler,
experiments/fast_path/README.md). Here each decoder layer is captured twice for the batch shape it trains on:
its forward without gradients (what checkpointing runs first) and its recomputation followed by its backward
(what checkpointing runs in the backward pass). A training step then launches two graphs a layer instead of
their kernels one by one (measured on 8B: 1.16x). A layer's input is kept from one graph to the other as
checkpointing keeps it; everything else lives in one memory pool the graphs share (they run one at a time),
held for the whole run: 1.11 GiB on 8B. Layers left uncheckpointed (train.uncheckpointed_layers) run eagerly.

Written by hand: torch.cuda.make_graphed_callables graphs a module's forward and backward but keeps each
layer's activations from one to the other (no checkpointing: ~0.45 GiB a layer more on 8B), and torch.compile
of a decoder layer broke its graph at the 4-bit matmuls and PEFT's code (experiments/fast_path/README.md).

A graph replays fixed addresses and shapes, so it is used only for what it was captured for: training mode
with gradients on, a batch of the captured shape (the collator pads train batches to batch x max_seq_length
tokens and a fixed number of examples: data.PackedCollator), the same varlen maximum length and keyword
values. Anything else (evaluation, a shorter batch, no gradients) runs the layer as before, checkpointed and
eager. What the graphs read besides the layer's input (rotary tables, position ids, sequence boundaries) is
copied once a step into buffers they share.

With train.activation_offload the input each graphed layer keeps for its backward (32 MiB a layer on 8B at
2 x 2048 tokens) waits in pinned host memory instead (HostCopies): copied out on a side stream while the next
layers run and copied back one layer ahead of the backward, so neither copy holds up the layers. transformers'
offload (torch's save_on_cpu) copies on the compute stream and would add every copy to the step.
"""

from __future__ import annotations

import functools
import logging

import torch

from .attention import packed_varlen
from .config import Config, ConfigError
from .distributed import world_size
from .fused_lora import lora_unfused_reason

log = logging.getLogger(__name__)

# the keyword tensors a decoder layer reads from the batch: each has a buffer the graphs read
BATCH_TENSORS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k")
# what the Trainer passes down through the model to every layer for the loss, which no layer reads
UNREAD = ("num_items_in_batch", "chunk_mem_const")


def check_cuda_graphs(cfg: Config) -> None:
    """train.cuda_graphs=true and what it needs, refused before any model loads."""
    from .models import resolve_dtype  # models imports transformers: only when graphs are asked for

    t, d = cfg.train, cfg.dataset
    if not t.cuda_graphs:
        return
    needs = (
        "train.gradient_checkpointing=true (the graphs are the checkpointed layer's two passes)"
        if not t.gradient_checkpointing
        else "train.checkpoint_every_n_layers=1"
        if t.checkpoint_every_n_layers != 1
        else "dataset.pack=true (packed rows give every batch the same shape)"
        if not d.pack
        else "a fixed train.batch_size, not auto"
        if t.batch_size == "auto"
        else "lora.dropout=0 (a graph replays the same dropout mask)"
        if cfg.lora.dropout
        else None
    )
    if needs:
        raise ConfigError(f"train.cuda_graphs=true needs {needs}; set that or train.cuda_graphs=false.")
    if not gpu_available():
        raise ConfigError("train.cuda_graphs=true needs a CUDA GPU; set train.cuda_graphs=false.")
    unfused = lora_unfused_reason(cfg)
    cannot = (
        f"the LoRA layers are not fused ({unfused})"
        if unfused
        else "packed rows do not use the varlen attention (train.packed_attention)"
        if not packed_varlen(cfg, resolve_dtype(cfg.model.dtype))
        else "more than one process trains (the graphs are tried on one GPU only)"
        if world_size() > 1
        else None
    )
    if cannot:
        raise ConfigError(f"train.cuda_graphs=true cannot run here: {cannot}; set train.cuda_graphs=false.")


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a causal LM (`model.layers` of transformers' decoder models), under PEFT."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(
            f"train.cuda_graphs=true: {type(inner).__name__} has no model.layers to graph; set "
            f"train.cuda_graphs=false."
        )
    return list(layers)


class LayerGraphs:
    """The two graphs of every decoder layer for one batch shape, the buffers they read and write, and the
    memory pool they share."""

    def __init__(self, layers: list[torch.nn.Module], offload: bool = False):
        self.layers = layers
        # train.activation_offload: every graphed layer's input but the last one's (its backward comes first)
        self.host = HostCopies() if offload and len(layers) > 1 else None
        self.params = [[p for p in layer.parameters() if p.requires_grad] for layer in layers]
        self.key = None  # the batch form the graphs are captured for: the first eligible one
        self.failed: str | None = None  # why capturing failed; every later call runs eager
        self.forward_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.backward_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.param_grads: dict[int, list[torch.Tensor]] = {}
        self.pool = None  # (memory pool, side stream): see new_pool
        self.pool_gib: float | None = None  # what the pool holds once every layer is captured
        self.buffers: dict[str, torch.Tensor] = {}
        self.loaded_from = None  # the rotary tables last copied into the buffers (one copy a step)
        self.replays = 0
        for i, layer in enumerate(layers):
            layer.forward = functools.partial(self.call, i, layer.forward)

    def status(self) -> str:
        if self.failed:
            return f"off (capture failed: {self.failed})"
        pool = f", pool {self.pool_gib:.2f} GiB" if self.pool_gib is not None else ""
        host = f", {len(self.layers) - 1} layer inputs kept in host memory" if self.host else ""
        return f"{len(self.backward_graphs)} layers captured, {self.replays} replays{pool}{host}"

    def form(self, layer, hidden, kwargs) -> tuple | None:
        """What a graph bakes in about this call, or None for a call the graphs never take."""
        if not (layer.training and torch.is_grad_enabled() and on_gpu(hidden)):
            return None
        if kwargs.get("attention_mask") is not None or kwargs.get("cache") is not None:
            return None
        rope = kwargs.get("position_embeddings")
        if not (isinstance(rope, tuple) and len(rope) == 2 and all(torch.is_tensor(r) for r in rope)):
            return None
        if any(not torch.is_tensor(kwargs.get(name)) for name in BATCH_TENSORS):
            return None
        rest = {k: v for k, v in kwargs.items() if k not in (*BATCH_TENSORS, *UNREAD, "position_embeddings")}
        if any(torch.is_tensor(v) for v in rest.values()):
            return None
        shapes = tuple((t.shape, t.dtype) for t in (hidden, *rope, *(kwargs[n] for n in BATCH_TENSORS)))
        return shapes, tuple(sorted(rest.items(), key=lambda kv: kv[0]))

    def call(self, index: int, eager, hidden, *args, **kwargs):
        """The layer's forward: a graph replay where one fits the call, its own forward otherwise."""
        layer = self.layers[index]
        form = None if args or self.failed else self.form(layer, hidden, kwargs)
        if form is None or (self.key is not None and form != self.key):
            return eager(hidden, *args, **kwargs)
        self.key = form
        self.load(kwargs)
        if index not in self.backward_graphs:
            try:
                self.capture(index, eager, hidden, kwargs)
            except Exception as error:  # a kernel that cannot be captured: the run goes on without graphs
                self.failed = f"layer {index}: {type(error).__name__}: {error}".splitlines()[0]
                log.warning("train.cuda_graphs: capture failed, training on without graphs: %s", self.failed)
                return eager(hidden, *args, **kwargs)
        self.replays += 1
        return GraphedLayer.apply(self, index, hidden, *self.params[index])

    def load(self, kwargs) -> None:
        """Copy this batch's rotary tables, position ids and boundaries into the graphs' buffers, once a step
        (every layer of a forward gets the same tensors)."""
        cos, sin = kwargs["position_embeddings"]
        if self.loaded_from is cos:
            return
        sources = {"cos": cos, "sin": sin, **{n: kwargs[n] for n in BATCH_TENSORS}}
        if not self.buffers:
            self.buffers = {name: t.detach().clone() for name, t in sources.items()}
        else:
            for name, t in sources.items():
                self.buffers[name].copy_(t)
        self.loaded_from = cos

    def graph_kwargs(self, kwargs) -> dict:
        b = self.buffers
        return {
            **{k: v for k, v in kwargs.items() if k not in UNREAD},
            "position_embeddings": (b["cos"], b["sin"]),
            **{n: b[n] for n in BATCH_TENSORS},
        }

    def capture(self, index: int, eager, hidden, kwargs) -> None:
        """Capture layer `index`'s two graphs (after one eager run of each on a side stream, which compiles
        Triton kernels and sets up cuBLAS outside the capture)."""
        layer, params = self.layers[index], self.params[index]
        kw = self.graph_kwargs(kwargs)
        if "hidden" not in self.buffers:  # the layers' input, output and their gradients: one shape
            for name in ("hidden", "out", "grad", "grad_hidden"):
                self.buffers[name] = torch.zeros_like(hidden, requires_grad=False)
        b = self.buffers
        grads = [torch.zeros_like(p) for p in params]

        def forward():
            with torch.no_grad():
                b["out"].copy_(eager(b["hidden"], **kw))

        def backward():
            with torch.enable_grad():
                hidden = b["hidden"].detach().requires_grad_(True)
                out = eager(hidden, **kw)
                got = torch.autograd.grad(out, [hidden, *params], b["grad"], allow_unused=True)
            b["grad_hidden"].copy_(got[0])
            for buffer, g in zip(grads, got[1:], strict=True):
                if g is not None:
                    buffer.copy_(g)

        # the graphs are the checkpointed passes themselves: the layer runs plainly inside them
        checkpointing, layer.gradient_checkpointing = getattr(layer, "gradient_checkpointing", False), False
        try:
            if self.pool is None:
                self.pool = new_pool()
            warm_up(self.pool, forward, backward)
            fwd, bwd = record(forward, self.pool), record(backward, self.pool)
        finally:
            layer.gradient_checkpointing = checkpointing
        self.forward_graphs[index], self.backward_graphs[index] = fwd, bwd
        self.param_grads[index] = grads
        if len(self.backward_graphs) == len(self.layers):
            release_cached()
            self.pool_gib = pool_bytes(self.pool) / 2**30


# The CUDA calls, one function each (tests replace them to run the rest on a CPU)
def gpu_available() -> bool:
    return torch.cuda.is_available()


def on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


def warm_up(pool, *passes) -> None:
    """Run each pass once on the capture stream before capturing it: Triton compiles, cuBLAS sets up there."""
    side = pool[1]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for run in passes:
            run()
    torch.cuda.current_stream().wait_stream(side)


def new_pool():
    """The graphs' memory pool, and the one side stream every layer is warmed up and captured on: cuBLAS
    keeps a workspace for every stream it runs on for the whole run, so a stream per layer would hold one per
    layer."""
    return torch.cuda.graph_pool_handle(), torch.cuda.Stream()


def record(run, pool) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool[0], stream=pool[1]):
        run()
    return graph


def pool_bytes(pool) -> int:
    """GPU memory the graphs' pool holds (its segments: free between replays, but no other tensor can use
    them)."""
    return sum(s["total_size"] for s in torch.cuda.memory_snapshot() if s.get("segment_pool_id") == pool[0])


def new_copy_stream():
    return torch.cuda.Stream()


def pinned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)


def device_of(stream) -> torch.device:
    return stream.device


def copy_on(stream, dst: torch.Tensor, src: torch.Tensor):
    """dst.copy_(src) on `stream` after what the compute stream has queued so far; returns the event of its
    end. A GPU source is kept from reuse until the copy has read it."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)
        if src.is_cuda:
            src.record_stream(stream)
        done = torch.cuda.Event()
        done.record()
    return done


def wait_for(event) -> None:
    torch.cuda.current_stream().wait_event(event)


def release_cached() -> None:
    """The eager warm-ups' blocks stay cached outside the graphs' pool once every layer is captured: give
    them back."""
    torch.cuda.empty_cache()


class GraphedLayer(torch.autograd.Function):
    """One decoder layer as its two graphs: the forward replays the no-gradient pass and keeps the input, the
    backward replays the recomputation and backward on it. The adapters' gradients come back through autograd
    (it adds them to .grad, or copies them there: the buffers are never handed over)."""

    @staticmethod
    def forward(ctx, graphs: LayerGraphs, index: int, hidden, *params):
        b = graphs.buffers
        b["hidden"].copy_(hidden)
        graphs.forward_graphs[index].replay()
        ctx.graphs, ctx.index = graphs, index
        ctx.offloaded = graphs.host is not None and index < len(graphs.layers) - 1
        if ctx.offloaded:
            graphs.host.save(index, hidden)
        else:
            ctx.save_for_backward(hidden)
        return b["out"].clone()  # the next layer overwrites the buffer

    @staticmethod
    def backward(ctx, grad):
        graphs, b, index = ctx.graphs, ctx.graphs.buffers, ctx.index
        hidden = graphs.host.take(index) if ctx.offloaded else ctx.saved_tensors[0]
        if graphs.host is not None and index > 0:
            graphs.host.fetch(index - 1)  # the layer whose backward comes next: copied back during this one
        b["hidden"].copy_(hidden)
        b["grad"].copy_(grad)
        graphs.backward_graphs[index].replay()
        return (None, None, b["grad_hidden"].clone(), *graphs.param_grads[index])


class HostCopies:
    """train.activation_offload under graphs: layer inputs in pinned host memory between forward and backward,
    copied on one side stream (its order keeps each input's copy out before its copy back)."""

    def __init__(self):
        self.stream = None  # made at the first copy, on the GPU the layers train on
        self.host: dict[int, torch.Tensor] = {}  # layer index -> its pinned buffer, reused every step
        self.back: dict[int, tuple] = {}  # layer index -> (its input on the GPU, the event of its copy back)

    def save(self, index: int, hidden: torch.Tensor) -> None:
        if self.stream is None:
            self.stream = new_copy_stream()
        if index not in self.host:
            self.host[index] = pinned_like(hidden)
        self.back.pop(index, None)  # a copy back that no backward took (a step that stopped early) is stale
        copy_on(self.stream, self.host[index], hidden)

    def fetch(self, index: int) -> None:
        if index in self.host and index not in self.back:
            # made on the compute stream, which reads it and frees it; the copy stream waits for that stream
            host = self.host[index]
            gpu = torch.empty(host.shape, dtype=host.dtype, device=device_of(self.stream))
            self.back[index] = gpu, copy_on(self.stream, gpu, host)

    def take(self, index: int) -> torch.Tensor:
        self.fetch(index)  # not fetched ahead (the first offloaded backward of a step): now
        gpu, done = self.back.pop(index)
        wait_for(done)
        return gpu


def install(model, fused: int, offload: bool = False) -> LayerGraphs:
    """Route every decoder layer of `model` through graphs (captured at the first training step); `fused`: how
    many LoRA layers the fused path took (validate() has checked that it takes them)."""
    if not fused:
        raise ConfigError(
            "train.cuda_graphs=true cannot run here: this model has no LoRA layer the fused path covers; set "
            "train.cuda_graphs=false."
        )
    # layers left uncheckpointed (train.uncheckpointed_layers) keep their activations and run eagerly
    layers = [layer for layer in decoder_layers(model) if getattr(layer, "gradient_checkpointing", True)]
    if not layers:
        raise ConfigError(
            "train.cuda_graphs=true graphs the checkpointed decoder layers and train.uncheckpointed_layers "
            "leaves none; lower it or set train.cuda_graphs=false."
        )
    return LayerGraphs(layers, offload)
