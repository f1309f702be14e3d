"""The battery of user mistakes and the sentence each must get. Add a row with every new option.

Each row: (id, command-line arguments, fragments the one `error:` line must contain). `{tmp}` stands for a
folder holding the files written by `write_bad_files`; `{run}` for a saved run (its .hydra/config.yaml)
trained on GSM8K. Rows without run_dir get the tiny test model's settings (tests/conftest.py TINY) in front.
Every row must fail before any data or model is loaded: tests/test_bad_inputs.py checks each in-process
through the functions `python -m qlora_lab` runs first, and a few through the real command line.
"""

from __future__ import annotations

import json
from pathlib import Path

RECORD = {"instruction": "Say hi.", "input": "", "output": "Hi."}

BAD_INPUTS = [
    # config values
    ("negative learning rate", ["train.learning_rate=-1"], ["train.learning_rate", "positive"]),
    ("unknown scheduler", ["train.scheduler=bogus"], ["train.scheduler=bogus", "cosine"]),
    ("zero lora rank", ["lora.r=0"], ["lora.r"]),
    (
        "sampling at temperature 0",
        ["generation=sampling", "generation.temperature=0"],
        ["generation.temperature"],
    ),
    ("top_p above 1", ["generation.top_p=1.5"], ["generation.top_p"]),
    ("zero inference batch", ["pipeline=infer", "inference.batch_size=0"], ["inference.batch_size"]),
    ("zero prompts", ["pipeline=infer", "inference.num_prompts=0"], ["inference.num_prompts"]),
    ("web port out of range", ["pipeline=web", "web.port=70000"], ["web.port", "65535"]),
    ("zero repeats", ["sweep.repeats=0"], ["sweep.repeats", "1 or more"]),
    (
        "memory cap without the batch search",
        ["train.memory_cap_gib=2"],
        ["train.memory_cap_gib=2", "train.batch_size=auto"],
    ),
    (
        "negative memory cap",
        ["train.batch_size=auto", "train.memory_cap_gib=-1"],
        ["train.memory_cap_gib", "positive"],
    ),
    (
        "zero auto batch start",
        ["train.batch_size=auto", "train.auto_batch_start=0"],
        ["train.auto_batch_start"],
    ),
    (
        "equal memory against an auto batch",
        ["sweep.equal_memory=true", "train.batch_size=auto"],
        ["sweep.equal_memory", "train.batch_size=auto", "set train.batch_size to a number"],
    ),
    ("custom dataset without a path", ["dataset=custom"], ["dataset.path", "dataset=custom"]),
    (
        "negative int8 threshold",
        ["quantization=int8", "quantization.int8_threshold=-1"],
        ["quantization.int8_threshold", "0 or more"],
    ),
    ("unknown stage", ["pipeline.stages=[train,fly]"], ["'fly'", "known stages: train"]),
    # the settings of later stages, checked before the first stage runs
    (
        "compare without its reference",
        ["pipeline.stages=[train,compare]", "inference.modes=[merged,base]"],
        ["inference.modes=['merged', 'base']", "must include adapter"],
    ),
    (
        "dequantized merge of a LoRA run",
        ["quantization=none", "pipeline.stages=[train,merge]", "merge.base=dequantized"],
        ["merge.base=dequantized", "merge.base=original"],
    ),
    (
        "merge shard size not a size",
        ["pipeline.stages=[train,merge]", "merge.max_shard_size=lots"],
        ["merge.max_shard_size='lots'", "2GB"],
    ),
    (
        "unknown export target",
        ["pipeline.stages=[train,export]", "export.targets=[gguf:q3]"],
        ["export.targets has 'gguf:q3'", "q8_0"],
    ),
    (
        "export measured on no examples",
        ["pipeline.stages=[train,export]", "inference.agreement_examples=0"],
        ["inference.agreement_examples", "export.measure=false"],
    ),
    # `+key` for a key the schema lacks: Hydra accepts it, nothing would read it
    ("+ on a typo", ["+lora.rank=8"], ["lora.rank", "lora.r?"]),
    (
        "+ on an unknown train key",
        ["+train.resume_from_checkpoint=outputs/x"],
        ["train.resume_from_checkpoint", "train.resume"],
    ),
    # one run per stage: run_dir with a training pipeline, resume without a run
    (
        "train into another run",
        ["+experiment=inference_modes", "run_dir={run}"],
        ["run_dir=", "train.resume=true", "pipeline.stages=[merge,compare]"],
    ),
    ("resume without run_dir", ["train.resume=true"], ["train.resume=true needs run_dir"]),
    (
        "resume with another pipeline",
        ["pipeline=evaluate", "run_dir={run}", "train.resume=true"],
        ["pipeline.name=evaluate", "differs from the run being resumed", "run_dir=", "drop pipeline=..."],
    ),
    ("missing run_dir", ["pipeline=evaluate", "run_dir={tmp}/no_such_run"], ["run_dir=", "does not exist"]),
    (
        "inherited dataset file gone",
        ["pipeline=evaluate", "run_dir={tmp}/run_lost_data"],
        ["dataset.path=", "no such file", "came from run_dir="],
    ),
    (
        "merge without the run's dataset file",
        ["pipeline=merge", "run_dir={tmp}/run_lost_data"],
        ["dataset.path=", "no such file", "came from run_dir="],
    ),
    # data files
    ("missing data file", ["dataset.path={tmp}/no_such.json"], ["dataset.path=", "no such file"]),
    (
        "records under a key",
        ["dataset.path={tmp}/wrapped.json"],
        ["wrapped.json", "'data' key", "top-level JSON list"],
    ),
    ("truncated JSON", ["dataset.path={tmp}/truncated.json"], ["truncated.json", "line 3", "truncated"]),
    ("non-UTF-8 JSON", ["dataset.path={tmp}/latin1.json"], ["latin1.json", "line 3", "not UTF-8"]),
    ("bad JSONL line", ["dataset.path={tmp}/bad_line.jsonl"], ["bad_line.jsonl", "line 4", "not valid JSON"]),
    (
        "list-valued column",
        ["dataset=custom", "dataset.path={tmp}/sharegpt.json", "dataset.columns.instruction=conversations"],
        ["record 0", "'conversations'", "dataset.columns.instruction", "list"],
    ),
    ("empty file", ["dataset.path={tmp}/empty.jsonl"], ["empty.jsonl", "no records"]),
    # conversation records: the record and the field
    (
        "unknown role",
        ["dataset=custom", "dataset.path={tmp}/unknown_role.json"],
        ["record 2", "conversations[1].from is 'bot'", "human, gpt"],
    ),
    (
        "empty conversation",
        ["dataset=custom", "dataset.path={tmp}/empty_conversation.jsonl"],
        ["record 1", "'messages'", "empty conversation"],
    ),
    (
        "no assistant turn",
        ["dataset=custom", "dataset.path={tmp}/no_answer.jsonl"],
        ["record 3", "'messages'", "no assistant turn"],
    ),
    (
        "two formats in one file",
        ["dataset=custom", "dataset.path={tmp}/mixed.jsonl"],
        ["record 4", "openai", "record 0", "sharegpt", "one format"],
    ),
    (
        "tools not JSON",
        ["dataset=custom", "dataset.path={tmp}/bad_tools.json"],
        ["record 1", "tools is not valid JSON"],
    ),
    (
        "function call not JSON",
        ["dataset=custom", "dataset.path={tmp}/bad_call.json"],
        ["record 0", "conversations[1].value is not valid JSON"],
    ),
    (
        "image part",
        ["dataset=custom", "dataset.path={tmp}/image_part.jsonl"],
        ["record 0", "messages[0].content[1]", "type 'image_url'", "only text parts"],
    ),
    ("alpaca history not pairs", ["dataset.path={tmp}/bad_history.json"], ["record 0", "history[0]", "pair"]),
    (
        "text part without text",
        ["dataset=custom", "dataset.path={tmp}/empty_text_part.jsonl"],
        ["record 0", "messages[0].content[0]", "no string in 'text' or 'value'", "keys: type, content"],
    ),
    (
        "loss_weight not 0 or 1",
        ["dataset=custom", "dataset.path={tmp}/bad_weight.jsonl"],
        ["record 1", "messages[1].loss_weight is 0.5", "0 (not trained) or 1"],
    ),
    (
        "loss_weight 1 on a user turn",
        ["dataset=custom", "dataset.path={tmp}/user_weight.jsonl"],
        ["record 0", "messages[0].loss_weight is 1 on a user turn", "only assistant turns"],
    ),
    (
        "every answer loss_weight 0",
        ["dataset=custom", "dataset.path={tmp}/untrained.jsonl"],
        ["record 2", "every assistant turn has loss_weight 0", "nothing in it would be trained"],
    ),
    # prompts file: checked before the model loads
    (
        "missing prompts file",
        ["pipeline=infer", "inference.prompts_file={tmp}/no_prompts.txt"],
        ["inference.prompts_file=", "no such file"],
    ),
    (
        "empty prompts file",
        ["pipeline=infer", "inference.prompts_file={tmp}/blank.txt"],
        ["inference.prompts_file=", "no prompts"],
    ),
    (
        "non-UTF-8 prompts file",
        ["pipeline=infer", "inference.prompts_file={tmp}/latin1_prompts.txt"],
        ["inference.prompts_file=", "line 2", "not UTF-8"],
    ),
    # second round (issue 26): values transformers would refuse only after the model loaded
    (
        "unknown optimizer",
        ["train.optim=bogus"],
        ["train.optim=bogus", "not a transformers optimizer", "adamw_torch"],
    ),
    (
        "misspelt optimizer",
        ["train.optim=adamw_torh"],
        ["train.optim=adamw_torh", "did you mean adamw_torch?"],
    ),
    (
        "report_to without its package",
        ["train.report_to=[wandb]"],
        ["train.report_to", "'wandb'", "pip install wandb"],
    ),
    (
        "unknown report_to",
        ["train.report_to=[tensorbord]"],
        ["train.report_to", "'tensorbord'", "tensorboard"],
    ),
    (
        "output_dir is a file",
        ["paths.output_dir={tmp}/empty.jsonl"],
        ["paths.output_dir=", "empty.jsonl is a file"],
    ),
    (
        "cache_dir under a file",
        ["paths.cache_dir={tmp}/empty.jsonl/cache"],
        ["paths.cache_dir=", "empty.jsonl is a file"],
    ),
    (
        "truncated model weights",
        ["model=hf", "model.name_or_path={tmp}/cut_model"],
        ["model.name_or_path=", "model.safetensors is damaged", "cut short"],
    ),
    (
        "truncated adapter",
        ["pipeline=evaluate", "run_dir={tmp}/run_cut_adapter"],
        ["run_dir=", "adapter_model.safetensors is damaged", "cut short"],
    ),
    (
        "unknown random architecture",
        ["model.random_init.model_type=lama"],
        ["model.random_init.model_type=lama", "not a transformers architecture", "llama"],
    ),
    (
        "flash attention without CUDA or flash-attn",
        ["model.attn_implementation=flash_attention_2"],
        ["model.attn_implementation=flash_attention_2", "sdpa"],
    ),
    (
        "unknown attention",
        ["model.attn_implementation=spda"],
        ["model.attn_implementation=spda", "did you mean sdpa?"],
    ),
    (
        "tokenizer folder missing",
        ["model.tokenizer={tmp}/no_tokenizer"],
        ["model.tokenizer=", "not a folder"],
    ),
    ("model=hf without a path", ["model=hf"], ["model.name_or_path is not set", "model=hf"]),
    (
        "ragged CSV row",
        ["dataset=custom", "dataset.path={tmp}/ragged.csv"],
        ["ragged.csv", "line 4 has 4 fields but the header has 3", "quotes"],
    ),
    (
        "empty numeric CSV cell as output",
        ["dataset=custom", "dataset.path={tmp}/nan_output.csv", "dataset.columns.output=answer"],
        ["nan_output.csv", "record 3", "'answer'", "empty or missing"],
    ),
    (
        "NaN Parquet output",
        ["dataset=custom", "dataset.path={tmp}/nan_output.parquet"],
        ["nan_output.parquet", "record 2", "'output'", "empty or missing"],
    ),
    # the web app: a login wherever other machines can reach it
    (
        "web app on every interface without a login",
        ["pipeline=web", "web.host=0.0.0.0"],
        ["web.host=0.0.0.0", "web.auth=USER:PASSWORD"],
    ),
    ("web login without a password", ["pipeline=web", "web.auth=me"], ["web.auth", "USER:PASSWORD"]),
    # LoRA variants and initialisations (issue 25): what PEFT and bitsandbytes cannot do
    (
        "LoftQ without a 4-bit base",
        ["quantization=none", "lora.init=loftq"],
        ["lora.init=loftq", "quantization=none", "quantization=nf4"],
    ),
    (
        "LoftQ on an int8 base",
        ["quantization=int8", "lora.init=loftq"],
        ["lora.init=loftq", "quantization=int8"],
    ),
    (
        "PiSSA on a 4-bit base",
        ["quantization=nf4", "lora.init=pissa"],
        ["lora.init=pissa", "quantization=nf4", "quantization=none", "lora.init=loftq"],
    ),
    (
        "DoRA on an int8 base",
        ["quantization=int8", "lora.variant=dora"],
        ["lora.variant=dora", "quantization=int8", "quantization=nf4", "lora.variant=lora"],
    ),
    (
        "DoRA from a PiSSA start",
        ["quantization=none", "lora.variant=dora", "lora.init=pissa"],
        ["lora.variant=dora", "lora.init=pissa", "lora.init=default"],
    ),
    (
        "DoRA from a LoftQ start",
        ["lora.variant=dora", "lora.init=loftq"],
        ["lora.variant=dora", "lora.init=loftq"],
    ),
    (
        "fused LoRA layers with DoRA",
        ["train.lora_layers=fused", "lora.variant=dora"],
        ["train.lora_layers=fused", "lora.variant=dora has no fused form", "train.lora_layers=auto"],
    ),
    (
        "grouped projections without fused LoRA layers",
        ["train.group_projections=on", "train.lora_layers=peft"],
        ["train.group_projections=on", "train.lora_layers=peft", "train.group_projections=auto"],
    ),
    ("negative GPU memory cap", ["train.gpu_memory_cap_gib=-1"], ["train.gpu_memory_cap_gib", "positive"]),
    (
        "CUDA graphs without checkpointing",
        ["train.cuda_graphs=true"],
        ["train.cuda_graphs=true", "train.gradient_checkpointing=true", "train.cuda_graphs=false"],
    ),
    (
        "random weights in memory without FSDP",
        ["quantization=nf4", "model.random_in_memory=true"],
        ["model.random_in_memory", "accelerate/fsdp_2gpu.yaml", "drop model.random_in_memory"],
    ),
    (
        "random weights in memory of a non-random model",
        ["model.random_init=null", "model.random_in_memory=true"],
        ["model.random_in_memory", "no random_init"],
    ),
    ("zero generation batch", ["eval.generation_batch_size=0"], ["eval.generation_batch_size", "positive"]),
]


def write_bad_files(tmp: Path, saved_run_config) -> None:
    """The files the rows above refer to. `saved_run_config(dir, overrides)` saves a run's
    .hydra/config.yaml."""
    good = [dict(RECORD, instruction=f"Say hi {i}.") for i in range(12)]
    (tmp / "wrapped.json").write_text(json.dumps({"data": good}))
    (tmp / "truncated.json").write_text("[\n" + json.dumps(good[0]) + ",\n" + json.dumps(good[1])[:20])
    (tmp / "latin1.json").write_bytes(
        ("[\n" + json.dumps(good[0]) + ",\n").encode() + b'{"instruction": "caf\xe9", "output": "x"}\n]'
    )
    (tmp / "bad_line.jsonl").write_text(
        "\n".join(json.dumps(r) for r in good[:3]) + '\n{"instruction": "x" "output"}\n'
    )
    (tmp / "sharegpt.json").write_text(
        json.dumps([{"conversations": [{"from": "human", "value": "hi"}], "output": "Hi."}] * 12)
    )
    (tmp / "empty.jsonl").write_text("")
    chat = {
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
        "tools": "[]",
    }
    (tmp / "unknown_role.json").write_text(
        json.dumps(
            [
                chat,
                chat,
                {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]},
            ]
            + [chat] * 9
        )
    )
    messages = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    lines = [messages, {"messages": []}, messages, {"messages": [{"role": "user", "content": "Hi"}]}]
    (tmp / "empty_conversation.jsonl").write_text(
        "\n".join(json.dumps(r) for r in lines[:2] + [messages] * 10)
    )
    (tmp / "no_answer.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [messages] * 3 + lines[3:] + [messages] * 8)
    )
    (tmp / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in [chat] * 4 + [messages] + [chat] * 7))
    (tmp / "bad_tools.json").write_text(json.dumps([chat, dict(chat, tools='[{"name": "f",')] + [chat] * 10))
    call = {
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "function_call", "value": "f(x=1)"},
            {"from": "observation", "value": "1"},
            {"from": "gpt", "value": "One."},
        ]
    }
    (tmp / "bad_call.json").write_text(json.dumps([call] + [chat] * 11))
    image = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "x.png"}},
                ],
            },
            {"role": "assistant", "content": "A cat."},
        ]
    }
    (tmp / "image_part.jsonl").write_text("\n".join(json.dumps(r) for r in [image] + [messages] * 11))
    weighted = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "loss_weight": 0.5},
        ]
    }
    (tmp / "empty_text_part.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "text", "content": "Hi"}]},
                        {"role": "assistant", "content": "Hello"},
                    ]
                }
            ]
            + [messages] * 11
        )
    )
    (tmp / "bad_weight.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [messages, weighted] + [messages] * 10)
    )
    user_weight = {
        "messages": [
            {"role": "user", "content": "Hi", "loss_weight": 1},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    (tmp / "user_weight.jsonl").write_text("\n".join(json.dumps(r) for r in [user_weight] + [messages] * 11))
    untrained = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "loss_weight": 0},
        ]
    }
    (tmp / "untrained.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [messages] * 2 + [untrained] + [messages] * 9)
    )
    (tmp / "bad_history.json").write_text(
        json.dumps([dict(RECORD, history=[["only a prompt"]])] + [RECORD] * 11)
    )
    (tmp / "blank.txt").write_text("\n  \n")
    (tmp / "latin1_prompts.txt").write_bytes(b"Hello\nGr\xfc\xdf Gott\n")
    from safetensors.torch import save_file

    weights = {"w": __import__("torch").zeros(64, 64)}
    (tmp / "cut_model").mkdir()
    (tmp / "cut_model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file(weights, tmp / "cut_model" / "model.safetensors")
    cut_short(tmp / "cut_model" / "model.safetensors")
    adapter = saved_run_config(
        tmp / "run_cut_adapter", ["model=tiny_random", "dataset=gsm8k", "dataset.size=8"]
    )
    (adapter / "adapter").mkdir()
    (adapter / "adapter" / "adapter_config.json").write_text("{}")
    save_file(weights, adapter / "adapter" / "adapter_model.safetensors")
    cut_short(adapter / "adapter" / "adapter_model.safetensors")
    rows = [f"q{i},,{i}" for i in range(12)]
    (tmp / "ragged.csv").write_text(
        "\n".join(["instruction,input,output", *rows[:2], "a,b,1,000", *rows[2:]]) + "\n"
    )
    (tmp / "nan_output.csv").write_text(
        "\n".join(["instruction,answer", *(f"q{i},{'' if i == 3 else i}" for i in range(12))]) + "\n"
    )
    import pandas as pd

    pd.DataFrame(
        {
            "instruction": [f"q{i}" for i in range(12)],
            "output": [float("nan") if i == 2 else float(i) for i in range(12)],
        }
    ).to_parquet(tmp / "nan_output.parquet")
    lost = tmp / "lost.json"
    lost.write_text(json.dumps(good))
    saved_run_config(
        tmp / "run_lost_data", ["model=tiny_random", f"dataset.path={lost}", "dataset.eval_size=4"]
    )
    lost.unlink()


def cut_short(path: Path) -> None:
    """A copy or download that stopped early: the file keeps its first half."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
