"""One layer of the nf4 run: how much of the LoRA update survives PEFT's in-memory merge into the 4-bit base.

Run from the project root after the nf4 experiment: PYTHONPATH=. .venv/bin/python
experiments/inference_modes/probe_merge_rounding.py
"""

from pathlib import Path

from peft import PeftModel
from peft.utils.integrations import dequantize_bnb_weight

from qlora_lab.config import register
from qlora_lab.layout import RunLayout

register()
from qlora_lab.models import load_model, model_path  # noqa: E402
from tests.conftest import make_cfg  # noqa: E402

cfg = make_cfg(["+experiment=inference_modes"])
run = Path("outputs/inference_modes/nf4")  # the nf4 experiment run
m = PeftModel.from_pretrained(load_model(model_path(cfg), cfg), RunLayout(run).adapter)
layer = m.base_model.model.model.layers[3].mlp.down_proj  # any adapted layer
w0 = dequantize_bnb_weight(layer.base_layer.weight).float()
delta = layer.get_delta_weight("default").float()
qs = layer.base_layer.weight.quant_state
print("blocksize", qs.blocksize, "nested", qs.nested, "dtype", qs.dtype, qs.quant_type)
layer.merge()  # what merge_and_unload() does to every layer: dequantize, add, re-quantize
w1 = dequantize_bnb_weight(layer.base_layer.weight).float()
print(
    "delta norm",
    delta.norm().item(),
    "|w1-(w0+delta)|",
    (w1 - (w0 + delta)).norm().item(),
    "|w1-w0|",
    (w1 - w0).norm().item(),
    "|w0|",
    w0.norm().item(),
)
print("frac changed", (w1 != w0).float().mean().item())
