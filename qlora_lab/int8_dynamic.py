"""Dynamic int8 quantization of a merged model's linear layers for CPU inference, saved so it reloads alone.

PyTorch's `quantize_dynamic` stores each nn.Linear weight as int8 (one scale per output row) and quantizes the
activations on the fly at every matmul, with the fbgemm/x86 int8 kernels. torch.ao.quantization is deprecated in
favour of torchao, but torchao 0.18's int8 configs ran 20-25x slower than fp32 on our CPU (int8 dynamic and
weight-only, torch 2.13): the deprecated API is still the one with CPU kernels, so we use it.

The folder holds the Hugging Face config, generation config and tokenizer, plus the quantized state dict
(`model_int8.pt`, loaded with weights_only=True): reloading builds the architecture from the config without
initialising weights, quantizes it the same way and loads the saved int8 weights into it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

WEIGHTS = "model_int8.pt"
RUN_SUBDIR = Path("export") / "int8_dynamic"  # where the export stage writes it in a run


def quantize(model):
    """Every nn.Linear (lm_head included) -> int8 weights, per output channel; embeddings and norms stay fp32."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # its deprecation notice, once per call, says nothing the docstring doesn't
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model.float().cpu().eval(), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8)


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
    torch.save(quantize(model).state_dict(), folder / WEIGHTS)


def is_export(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file() and (folder / "config.json").is_file()


def load(folder: Path):
    """The int8 model from `folder` alone (no original weights needed), in eval mode on the CPU."""
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(folder)
    with no_init_weights():  # every weight is overwritten by the saved state dict below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = quantize(model)
    state = torch.load(folder / WEIGHTS, weights_only=True)
    model.load_state_dict(state, strict=True)
    model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()
