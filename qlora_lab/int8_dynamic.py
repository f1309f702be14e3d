"""Dynamic int8 quantization of a merged model's linear layers for CPU inference, saved so it reloads alone.

PyTorch's `quantize_dynamic` stores each nn.Linear weight as int8 (one scale per output row) and quantizes the
activations on the fly at every matmul, with the fbgemm/x86 int8 kernels. torch.ao.quantization is deprecated
in favour of torchao, but torchao 0.18's int8 configs ran 20-25x slower than fp32 on our CPU (int8 dynamic and
weight-only, torch 2.13): the deprecated API is still the one with CPU kernels, so we use it.

Dynamic quantization gives a whole activation tensor one int8 scale (7 bits on x86: fbgemm's reduce_range), so
the few very large activation channels of a transformer round the small ones away. On SmolLM2-135M, quantizing
every linear layer gave a mean KL(fp32 || int8) of 1.67 on two GSM8K prompts; keeping the MLP's down_proj and
up_proj, the attention's v_proj and lm_head in float (FLOAT_LAYERS) brought it to 0.069, and no cheaper choice
came close (experiments/export/README.md, probe_int8_layers.py). Those stay fp32; the other linear layers (q,
k, o and gate projections, about half of the blocks' weights) are int8.

The folder holds the Hugging Face config, generation config and tokenizer, the names of the layers kept in
float (`int8_dynamic.json`), plus the quantized state dict (`model_int8.pt`, loaded with weights_only=True):
reloading builds the architecture from the config without initialising weights, quantizes it the same way and
loads the saved weights into it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

WEIGHTS = "model_int8.pt"
LAYERS = "int8_dynamic.json"
# Linear layers (by the last part of their name) kept in float: the ones int8 hurts most (see the docstring).
FLOAT_LAYERS = ("down_proj", "up_proj", "v_proj", "lm_head")


def float_layers(model, kinds=FLOAT_LAYERS) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in kinds
    ]


def quantize(model, keep: list[str]):
    """Every nn.Linear not named in `keep` -> int8 weights, per output channel; embeddings and norms stay
    fp32."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = model.float().cpu().eval()
    chosen = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - set(keep)
    with (
        warnings.catch_warnings()
    ):  # its deprecation notice, once per call, says nothing the docstring doesn't
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in chosen}, dtype=torch.qint8)


def save(model, tokenizer, folder: Path) -> None:
    """`model`: an fp32 merged model (not yet quantized). Writes config, tokenizer and the int8 state dict."""
    folder.mkdir(parents=True)
    # A tied lm_head would be quantized separately from the embedding: record it untied so the reload matches.
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    keep = float_layers(model)
    (folder / LAYERS).write_text(json.dumps({"float_layers": keep}, indent=2) + "\n")
    torch.save(quantize(model, keep).state_dict(), folder / WEIGHTS)


def is_export(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file() and (folder / "config.json").is_file()


def load(folder: Path):
    """The int8 model from `folder` alone (no original weights needed), in eval mode on the CPU."""
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(folder)
    with no_init_weights():  # every weight is overwritten by the saved state dict below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    layers = folder / LAYERS  # absent in an export that quantized every linear layer
    model = quantize(model, json.loads(layers.read_text())["float_layers"] if layers.is_file() else [])
    state = torch.load(folder / WEIGHTS, weights_only=True)
    model.load_state_dict(state, strict=True)
    model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()
