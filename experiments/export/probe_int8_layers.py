"""Which linear layers make dynamic int8 disagree with the merged model? Quantize one kind at a time.

    python experiments/export/probe_int8_layers.py RUN/merged   # or .cache/models/SmolLM2-135M-Instruct
    python experiments/export/probe_int8_layers.py RUN/merged blocks     # down_proj block by block

For each projection name (q_proj ... down_proj, lm_head) the merged fp32 model gets only those layers
quantized by PyTorch's quantize_dynamic (per output channel, as the int8 export does), then every linear layer
but the kinds named (kept in float), and the mean KL(merged || probe) of the next-token distributions over a
few GSM8K eval prompts is printed. With `blocks`: one down_proj at a time. A probe, not part of the pipeline;
it chose qlora_lab.int8_dynamic.FLOAT_LAYERS.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
    "How much did she earn?",
]


KEPT_FLOAT = [
    "down_proj",
    "lm_head",
    "down_proj,lm_head",
    "down_proj,lm_head,up_proj",
    "down_proj,up_proj,v_proj",
    "down_proj,lm_head,up_proj,v_proj",
    "down_proj,lm_head,up_proj,v_proj,gate_proj",
    "down_proj,lm_head,up_proj,v_proj,gate_proj,o_proj",
]


def main(merged: Path, blocks: bool = False) -> None:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    warnings.simplefilter("ignore")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        + "Natalia sold 48/2 = 24 clips in May."
        for p in PROMPTS
    ]
    batches = [tokenizer(t, return_tensors="pt")["input_ids"] for t in texts]
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logp = [reference(input_ids=ids).logits.log_softmax(-1) for ids in batches]
    print("| quantized layers | int8 layers | mean KL(merged ‖ probe) |\n|---|---|---|")
    n_layers = reference.config.num_hidden_layers
    probes = (
        [f"layers.{i}.mlp.down_proj" for i in range(n_layers)]
        if blocks
        else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "all"]
        + [f"all but {kinds}" for kinds in KEPT_FLOAT]
    )
    for kind in probes:
        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        if kind == "all":
            chosen = linears
        elif kind.startswith("all but "):
            kept = kind.removeprefix("all but ").split(",")
            chosen = [n for n in linears if n.rsplit(".", 1)[-1] not in kept]
        else:
            chosen = [n for n in linears if n.endswith(kind)]
        model = quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in chosen}, dtype=torch.qint8)
        with torch.no_grad():
            kls = [
                (r.exp() * (r - model(input_ids=ids).logits.log_softmax(-1))).sum(-1).mean()
                for r, ids in zip(ref_logp, batches, strict=True)
            ]
        print(f"| {kind} | {len(chosen)} | {torch.stack(kls).mean().item():.4f} |", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), blocks=sys.argv[2:] == ["blocks"])
