"""FSDP2 + 4-bit: build the model shard by shard, so that no rank ever holds the whole model (Answer.AI's
fsdp_qlora).

transformers places a bitsandbytes-quantized model whole on each rank's GPU, and FSDP shards it only
afterwards
(in accelerate's prepare): a 4-bit 70B (~37 GiB) never fits a 24 GiB GPU that way. Here each rank instead
1. builds the skeleton on the meta device (no memory), its Linear layers made bitsandbytes Linear4bit by
   transformers' own quantizer, and PEFT's LoRA layers attached, still on meta;
2. materializes one decoder layer at a time on its device: the base weights read from the checkpoint (only
   that layer's tensors) or drawn in memory (model.random_in_memory), quantized to 4 bits as transformers does
   it, the LoRA layers built by PEFT's own `update_layer` (so initialised as `get_peft_model` does, in the
   same order), then `fully_shard(layer)`: the rank keeps its shard and frees the rest before the next layer;
3. ends with the embedding and an untied LM head, each its own unit (the training loss reads the head's shards
   and never gathers it: sharded_loss.py), a tied one grouped with the final norm, and `fully_shard` of the
   whole model. accelerate's prepare returns a model that is already FSDP-sharded unchanged, so the Trainer
   runs as before. Per-rank load peak: about (the 4-bit model / world size) + one layer."""

from __future__ import annotations

import time

import torch
from torch import nn

from .config import Config, ConfigError, LoraInit, LoraVariant, QuantMethod
from .distributed import device, fsdp_enabled, world_size


def sharded_loading(cfg: Config) -> bool:
    """Whether the train stage loads the base shard by shard: under FSDP with a 4-bit base, always (loading
    the whole model on every rank first is never better). The one rule for validate() and the stage."""
    return fsdp_enabled() and cfg.quantization.method in (QuantMethod.nf4, QuantMethod.fp4)


def check_sharded_loading(cfg: Config) -> None:
    """What the shard-by-shard loading cannot do, refused before any model loads (validate() calls this)."""
    m = cfg.model
    if m.random_in_memory:
        if not m.random_init:
            raise ConfigError(
                "model.random_in_memory draws the weights of a model.random_init architecture, but this "
                "model has no random_init; drop model.random_in_memory."
            )
        if not sharded_loading(cfg):
            raise ConfigError(
                "model.random_in_memory needs the shard-by-shard loading of FSDP with a 4-bit base: launch "
                "with "
                "accelerate launch --config_file accelerate/fsdp_2gpu.yaml and quantization=nf4 (or fp4), or "
                "drop model.random_in_memory (the weights are then built once into a folder)."
            )
        if not m.tokenizer:
            raise ConfigError(
                "model.random_in_memory builds no model folder to read a tokenizer from; set model.tokenizer "
                "(e.g. embedded:SmolLM2-135M-Instruct)."
            )
        others = [s for s in cfg.pipeline.stages if s != "train"]
        if others:
            raise ConfigError(
                f"model.random_in_memory keeps its weights in the training processes only, so pipeline stage "
                f"{others[0]} would have no base to load; use pipeline=train, or drop model.random_in_memory."
            )
    if not sharded_loading(cfg):
        return
    if cfg.lora.init is LoraInit.loftq:
        raise ConfigError(
            "lora.init=loftq fits the adapter to the whole unsharded base, which FSDP's shard-by-shard "
            "loading never holds; use lora.init=default under FSDP, or DDP or one GPU for LoftQ."
        )
    if cfg.lora.variant is LoraVariant.dora:
        raise ConfigError(
            "lora.variant=dora is not built by FSDP's shard-by-shard loading of a 4-bit base (not tried); "
            "use lora.variant=lora under FSDP, or DDP or one GPU for DoRA."
        )
    if cfg.train.resume:
        raise ConfigError(
            "train.resume is not supported with FSDP's shard-by-shard loading of a 4-bit base (its "
            "checkpoints are not tried); start a new run, or resume with DDP."
        )


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of each decoder layer: the modules transformers keeps whole (`_no_split_modules`), which
    are also accelerate's FSDP wrap units (TRANSFORMER_BASED_WRAP)."""
    classes = set(model._no_split_modules or [])
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in classes]


class Weights:
    """Each base tensor by name: read from the checkpoint's safetensors files (only the tensors asked for), or
    drawn in memory as transformers initialises the architecture (N(0, initializer_range) matrices, ones for
    norms, zeros for biases), from one seeded stream per group so that every rank draws the same values."""

    def __init__(self, path: str | None, config, target: torch.device, dtype: torch.dtype):
        from .models import full_precision_weights

        self.files = (
            full_precision_weights(path, "FSDP's shard-by-shard loading", "train with DDP or on one GPU")
            if path
            else None
        )
        self.path, self.config, self.target, self.dtype = path, config, target, dtype
        self.generator = None

    def start_group(self, index: int) -> None:
        """In-memory weights: one random stream per group (0: embedding, 1..n: decoder layers, n + 1: the
        rest), seeded by its index, so that every rank draws each layer alike without drawing the layers
        before it."""
        if self.files is None:
            self.generator = torch.Generator(self.target).manual_seed(index)

    def get(self, key: str, shape: torch.Size, prefix: str) -> torch.Tensor:
        if self.files is None:
            out = torch.empty(shape, dtype=self.dtype, device=self.target)
            if len(shape) > 1:
                return out.normal_(0.0, self.config.initializer_range, generator=self.generator)
            return out.fill_(0.0 if key.endswith("bias") else 1.0)
        from safetensors import safe_open

        name = key if key in self.files else f"{prefix}.{key}".removeprefix(".")
        if name not in self.files and key.removeprefix(prefix + ".") in self.files:
            name = key.removeprefix(prefix + ".")
        if name not in self.files:
            raise ConfigError(
                f"FSDP's shard-by-shard loading found no tensor {key} in {self.path}'s safetensors files; "
                f"load this model with DDP or on one GPU."
            )
        with safe_open(self.files[name], framework="pt", device="cpu") as f:
            return f.get_tensor(name).to(self.target, self.dtype)


@torch.no_grad()
def materialize(modules, names: dict, weights: Weights, prefix: str) -> None:
    """Give every base parameter of `modules` (meta tensors) its values on the target device; 4-bit layers'
    weights quantized as transformers' loader does (bnb.nn.Params4bit(...).to(device)). A tied parameter is
    made once."""
    import bitsandbytes as bnb

    # meta parameter -> its real one; per call, so that nothing holds a layer once it is sharded
    made: dict[int, nn.Parameter] = {}
    for top in modules:
        for sub_name, sub in top.named_modules(prefix=names[top]):
            if "lora_" in sub_name:  # the adapter: PEFT builds it (make_lora)
                continue
            for pname, param in list(sub._parameters.items()):
                if param is None or not param.is_meta:
                    continue
                if id(param) not in made:
                    key = f"{sub_name}.{pname}".replace(".base_layer", "")
                    value = weights.get(key, param.shape, prefix)
                    if isinstance(param, bnb.nn.Params4bit):
                        new = bnb.nn.Params4bit(value, requires_grad=False, **param.__dict__).to(
                            weights.target
                        )
                    else:
                        new = nn.Parameter(value, requires_grad=False)
                    made[id(param)] = new
                sub._parameters[pname] = made[id(param)]
            for bname, buf in list(sub._buffers.items()):
                if buf is not None:
                    sub._buffers[bname] = buf.to(weights.target)


def make_lora(module: nn.Module, names: dict, peft_model, adapter: str = "default") -> None:
    """Build the LoRA layers inside `module` on its now real base weights with PEFT's own `update_layer` (what
    `get_peft_model` calls: the same initialisation, the same random draws in the same order), adapters in
    fp32 as `get_peft_model` leaves them."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import cast_adapter_dtype

    config = peft_model.peft_config[adapter]
    for name, layer in module.named_modules(prefix=names[module]):
        if isinstance(layer, LoraLayer):
            layer.update_layer(
                adapter, config.r, lora_alpha=config.lora_alpha, target_name=name, config=config
            )
    cast_adapter_dtype(module, adapter)


def skeleton(path: str | None, cfg: Config, dtype: torch.dtype):
    """The causal LM on the meta device with 4-bit Linear layers (transformers' bitsandbytes quantizer) and
    PEFT's LoRA layers: the same modules as `load_model` + `attach_lora` build, with no weights yet."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    from accelerate import init_empty_weights

    from .models import attach_lora, bnb_config

    m = cfg.model
    if path is None:
        spec = dict(m.random_init)
        config = AutoConfig.for_model(spec.pop("model_type", "llama"), **spec)
    else:
        config = AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code)
    quantizer = AutoHfQuantizer.from_config(bnb_config(cfg.quantization, dtype), pre_quantized=False)
    # Nothing here may draw from the run's random stream: the LoRA layers draw theirs later, as get_peft_model
    # would
    with torch.random.fork_rng():
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(
                config,
                dtype=dtype,
                attn_implementation=m.attn_implementation,
                trust_remote_code=m.trust_remote_code,
            )
            quantizer.preprocess_model(model, device_map=None)
        # outside init_empty_weights, which gives every parameter set on a module a copy of its own
        model.tie_weights()  # a tied LM head shares the embedding's parameter, as after from_pretrained
        quantizer.postprocess_model(model)  # marks it loaded in 4 bits, as PEFT and the Trainer look for
        model.hf_quantizer = quantizer
        if path is not None:
            # the adapter's base_model_name_or_path, as from_pretrained sets it
            model.config._name_or_path = path
        return attach_lora(model, cfg, on_meta=True)


def load_sharded(path: str | None, cfg: Config):
    """The PEFT model sharded by FSDP2 across the ranks, built layer by layer (see the module's docstring).
    `path`: the checkpoint folder or hub id, or None to draw random weights in memory
    (model.random_in_memory). Returns (model, base footprint in GiB, (trainable, total) parameters)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from .models import keep_one_cpu_4bit_path, resolve_dtype

    target = device()  # first: starts the process group and makes the rank's GPU the current one
    dtype = resolve_dtype(cfg.model.dtype)
    t0 = time.perf_counter()
    model = skeleton(path, cfg, dtype)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    causal_lm = model.get_base_model()
    names = {module: name for name, module in causal_lm.named_modules()}
    weights = Weights(path, causal_lm.config, target, dtype)
    prefix = causal_lm.base_model_prefix
    # No mixed-precision cast: each parameter computes in its own dtype (bf16 base, fp32 adapters), as
    # train.autocast decides and as the one-GPU run computes
    shard = {"mesh": init_device_mesh(target.type, (world_size(),)), "mp_policy": MixedPrecisionPolicy()}

    layers = decoder_layers(causal_lm)
    for index, (_, layer) in enumerate(layers, start=1):
        weights.start_group(index)
        materialize([layer], names, weights, prefix)
        make_lora(layer, names, model)
        fully_shard(layer, **shard)  # this rank keeps its shard; the whole layer is freed
    embed, head = causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    # the rest (final norm, LM head, rotary tables): accelerate's tail group, kept unsharded after the forward
    in_layers = {id(m) for _, layer in layers for m in layer.modules()}
    rest = [
        m for m in causal_lm.modules() if id(m) not in in_layers and m is not embed and not list(m.children())
    ]
    weights.start_group(0)
    if tied:  # one call: the LM head takes the embedding's new weight
        materialize([embed, *rest], names, weights, prefix)
    else:
        materialize([embed], names, weights, prefix)
        fully_shard(embed, **shard)
        weights.start_group(len(layers) + 1)
        materialize(rest, names, weights, prefix)
    if tied:  # the LM head is the embedding, gathered for the input anyway: kept whole until the backward
        norm = getattr(causal_lm.get_decoder(), "norm", None)
        tail = [m for m in (norm, embed, head) if m is not None and not isinstance(m, FSDPModule)]
        fully_shard(tail, **shard, reshard_after_forward=False)
    elif head is not None:
        # its own unit, which a training step never gathers: the loss reads its shards (sharded_loss.py); the
        # final norm stays in the root's group
        fully_shard(head, **shard)
    fully_shard(model, **shard)
    keep_one_cpu_4bit_path(model)
    if any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers()):
        missing = next(n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta)
        raise RuntimeError(f"shard-by-shard loading left {missing} without weights")
    # the whole base's bytes (every shard), as load_model's footprint counts them: 4-bit weights in their
    # storage
    footprint = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    footprint += sum(b.numel() * b.element_size() for b in model.buffers())
    print(
        f"FSDP: the base loaded shard by shard on {world_size()} ranks ({len(layers)} decoder layers, "
        f"{'random weights drawn in memory' if path is None else path}) in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return model, footprint / 2**30, (trainable, total)
