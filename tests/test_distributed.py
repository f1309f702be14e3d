"""DDP and FSDP through `accelerate launch`, and FSDP2 on gloo ranks: 2 CPU processes train the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, TINY, run_main

# FSDP on CPU processes, for tests (see its sitecustomize.py)
CPU_FSDP = ROOT / "tests" / "fixtures" / "cpu_fsdp"


def launch(run_dir: Path, *args: str, fsdp: bool = False) -> subprocess.CompletedProcess:
    """`accelerate launch` of the tiny run on 2 CPU processes (DDP, or FSDP through the test shim)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    if fsdp:
        env |= {"QLORA_LAB_TEST_CPU_FSDP": "1", "PYTHONPATH": os.pathsep.join([str(CPU_FSDP), str(ROOT)])}
    config = CPU_FSDP / "fsdp_2proc.yaml" if fsdp else ROOT / "accelerate" / "cpu_ddp_2proc.yaml"
    command = [
        str(Path(sys.executable).with_name("accelerate")),
        *("launch", "--config_file", str(config), "--num_processes", "2", "-m", "qlora_lab"),
    ]
    return subprocess.run(
        [*command, *TINY, *args, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


# The DDP nf4 run that test_two_process_ddp_ranks_agree checks and the FSDP test compares with: trained once
# per worker (make test's `--dist loadscope` runs this module on one worker).
DDP_NF4 = ("quantization=nf4", "train.batch_size=2", "lora.dropout=0", "train.gradient_checkpointing=true")


@pytest.fixture(scope="module")
def ddp_nf4(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("ddp_nf4") / "run"
    return run_dir, launch(run_dir, *DDP_NF4)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_two_process_ddp_ranks_agree(tmp_path, quant, request):
    if quant == "nf4":
        run_dir, result = request.getfixturevalue("ddp_nf4")
    else:
        run_dir = tmp_path / "run"
        result = launch(run_dir, "quantization=none", "train.batch_size=2", "lora.dropout=0")
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["distributed/world_size"] == 2
    assert metrics["distributed/adapters_identical"] is True
    assert len(set(metrics["distributed/adapter_sha256"])) == 1
    assert metrics["eval/loss"] < metrics["eval/loss_before"]
    # the two ranks split each epoch: 8 steps x 2 ranks x 2 examples = 32 examples seen of 24
    assert metrics["train/steps"] == 8 and metrics["train/tokens_seen"] > 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "run.json").read_text())["hardware"]["world_size"] == 2
    if quant == "none":
        # DDP is one process with the global batch: 2 ranks x 2 rows give the per-step losses of 1 process x 4
        # rows (without dropout, whose masks each rank draws from its own random stream)
        single = tmp_path / "single"
        # one process: this one (the same run as `python -m qlora_lab`, without another interpreter start-up)
        alone_run = run_main(
            *TINY, "quantization=none", "train.batch_size=4", "lora.dropout=0", f"hydra.run.dir={single}"
        )
        assert alone_run.returncode == 0, alone_run.stderr[-3000:]
        alone = json.loads((single / "metrics.json").read_text())
        assert len(metrics["train/losses"]) == len(alone["train/losses"]) == 8
        assert metrics["train/losses"] == pytest.approx(alone["train/losses"], abs=1e-5)
        assert metrics["eval/loss"] == pytest.approx(alone["eval/loss"], abs=1e-5)


def test_fsdp_qlora_train_stage_loads_shard_by_shard_and_matches_ddp(tmp_path, ddp_nf4):
    """The train stage under FSDP + nf4 with checkpointing (the Trainer's FSDP path, on 2 CPU processes) loads
    shard by shard and trains as DDP does with the same global batch: the same per-step losses and eval loss,
    and the same adapter, saved whole by rank 0 (fp32: to 1e-5)."""
    import torch
    from safetensors.torch import load_file

    dirs = {"fsdp": tmp_path / "fsdp", "ddp": ddp_nf4[0]}
    results = {"fsdp": launch(dirs["fsdp"], *DDP_NF4, fsdp=True), "ddp": ddp_nf4[1]}
    runs, printed = {}, {}
    for name, result in results.items():
        assert result.returncode == 0, result.stderr[-4000:]
        runs[name], printed[name] = json.loads((dirs[name] / "metrics.json").read_text()), result.stdout
    fsdp, ddp = runs["fsdp"], runs["ddp"]
    assert "FSDP: the base loaded shard by shard on 2 ranks" in printed["fsdp"]
    assert "shard by shard" not in printed["ddp"]
    assert fsdp["distributed/strategy"] == "fsdp" and ddp["distributed/strategy"] == "ddp"
    assert len(fsdp["train/losses"]) == 8
    assert fsdp["train/losses"] == pytest.approx(ddp["train/losses"], abs=1e-5)
    assert fsdp["eval/loss"] == pytest.approx(ddp["eval/loss"], abs=1e-5)
    assert fsdp["eval/loss"] < fsdp["eval/loss_before"]
    assert fsdp["params/total"] == ddp["params/total"] and fsdp["params/trainable"] == ddp["params/trainable"]
    adapters = {n: load_file(dirs[n] / "adapter" / "adapter_model.safetensors") for n in runs}
    assert adapters["fsdp"].keys() == adapters["ddp"].keys() and len(adapters["fsdp"]) == 28
    for key, tensor in adapters["ddp"].items():
        assert torch.allclose(adapters["fsdp"][key], tensor, rtol=0, atol=1e-5), key


def test_slurm_launcher_preset_composes():
    from hydra import compose, initialize_config_dir

    from .conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.timeout_min == 240


def test_plain_launch_on_several_gpus_trains_on_one_instead_of_data_parallel(tmp_path, monkeypatch, capsys):
    """The Trainer wraps the model in nn.DataParallel when it counts several GPUs; the guard keeps one per
    process."""
    import torch.nn as nn
    from transformers import Trainer, TrainingArguments

    from qlora_lab.distributed import one_gpu_per_process

    monkeypatch.setattr(sys, "argv", ["qlora_lab", "+experiment=quickstart", "dataset.path=my data.json"])
    model = nn.Linear(2, 2)

    def wrapped(guard: bool):
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
        args._n_gpu = 2  # what the Trainer counts on a machine with two GPUs
        line = one_gpu_per_process(args) if guard else None
        return Trainer(model=model, args=args)._wrap_model(model), line

    assert isinstance(wrapped(guard=False)[0], nn.DataParallel)
    module, line = wrapped(guard=True)
    assert module is model
    assert line == (
        "2 GPUs visible; training on the first only (one process, no DataParallel). To train on all 2 "
        "with DDP: accelerate launch --config_file accelerate/ddp_2gpu.yaml --num_processes 2 -m qlora_lab "
        "+experiment=quickstart 'dataset.path=my data.json'"
    )
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    args._n_gpu = 2
    monkeypatch.setenv("WORLD_SIZE", "2")  # under accelerate launch each rank has one GPU already
    assert one_gpu_per_process(args) is None


@pytest.mark.parametrize(
    "overrides, env, gpus, message",
    [
        (
            [],
            {"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "4"},
            2,
            "accelerate launch started 4 processes on this machine but it has 2 GPUs; set num_processes to "
            "at most 2 (--num_processes 2, or num_processes: in the accelerate config).",
        ),
        (
            ["train.batch_size=auto"],
            {"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"},
            2,
            "train.batch_size=auto lets each rank halve its batch after its own out-of-memory errors, so the "
            "ranks could train on different batches; under accelerate launch set train.batch_size to a "
            "number.",
        ),
        (
            ["quantization.storage_dtype=uint8"],
            {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"},
            0,
            "FSDP shards flat parameters of one dtype, but quantization.storage_dtype=uint8 differs from the "
            "model dtype float32; set quantization.storage_dtype=auto (the model dtype).",
        ),
        (
            ["quantization=nf4", "train.lora_layers=fused"],
            {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"},
            0,
            "train.lora_layers=fused cannot be used here: the fused layers are not tried on FSDP's sharded "
            "weights (train with DDP or one GPU); fix that or use train.lora_layers=auto.",
        ),
        (
            ["quantization=nf4", "train.resume=true"],
            {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"},
            0,
            "train.resume is not supported with FSDP's shard-by-shard loading of a 4-bit base (its "
            "checkpoints are not tried); start a new run, or resume with DDP.",
        ),
        (
            ["quantization=nf4", "lora.init=loftq"],
            {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"},
            0,
            "lora.init=loftq fits the adapter to the whole unsharded base, which FSDP's shard-by-shard "
            "loading never holds; use lora.init=default under FSDP, or DDP or one GPU for LoftQ.",
        ),
        (
            ["quantization=nf4", "lora.variant=dora"],
            {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"},
            0,
            "lora.variant=dora is not built by FSDP's shard-by-shard loading of a 4-bit base (not tried); "
            "use lora.variant=lora under FSDP, or DDP or one GPU for DoRA.",
        ),
        (
            ["quantization=nf4", "model.random_in_memory=true", "pipeline.stages=[train,evaluate]"],
            {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"},
            0,
            "model.random_in_memory keeps its weights in the training processes only, so pipeline stage "
            "evaluate would have no base to load; use pipeline=train, or drop model.random_in_memory.",
        ),
    ],
)
def test_distributed_launch_mistakes_are_refused_before_loading(monkeypatch, overrides, env, gpus, message):
    import torch

    from qlora_lab.config import ConfigError
    from qlora_lab.validation import validate

    from .conftest import make_cfg

    cfg = make_cfg([*TINY, *overrides])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value) == message


def test_fsdp_qlora_config_composes_and_validates(monkeypatch):
    """The documented FSDP QLoRA command line passes validate() under the FSDP launcher's environment."""
    from qlora_lab.validation import validate

    from .conftest import make_cfg

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    validate(make_cfg([*TINY, "quantization=nf4", "quantization.storage_dtype=auto", "train.batch_size=2"]))


def test_fsdp_70b_experiment_composes_and_validates(monkeypatch):
    """+experiment=multi_gpu_70b validates under the FSDP launcher (its weights drawn in memory, no folder
    built), and a plain launch of it is refused in one sentence saying how to launch it (on GPUs: its
    train.activation_offload needs one)."""
    import qlora_lab.layer_graphs
    from qlora_lab.config import ConfigError
    from qlora_lab.sharded_loading import sharded_loading
    from qlora_lab.validation import validate

    from .conftest import make_cfg

    monkeypatch.setattr(qlora_lab.layer_graphs, "gpu_available", lambda: True)
    cfg = make_cfg(["+experiment=multi_gpu_70b"])
    assert cfg.model.random_init.num_hidden_layers == 80 and cfg.model.random_init.hidden_size == 8192
    assert cfg.model.random_in_memory and cfg.train.gpu_memory_cap_gib == 24 and cfg.train.batch_size == 1
    with pytest.raises(ConfigError, match="model.random_in_memory needs the shard-by-shard loading of FSDP"):
        validate(cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    validate(cfg)
    assert sharded_loading(cfg)
    assert not sharded_loading(make_cfg([*TINY, "quantization=int8"]))


def test_gpu_memory_cap_sets_the_process_fraction(monkeypatch):
    """train.gpu_memory_cap_gib=24 on a 140 GiB GPU lets the process allocate 24/140 of it (a GPU faked
    here)."""
    import types

    import torch

    from qlora_lab.distributed import cap_gpu_memory

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=140 * 2**30)
    )
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    assert cap_gpu_memory(None) is None and calls == []
    line = cap_gpu_memory(24)
    assert calls == [(24 / 140, torch.device("cuda", 0))]
    assert line == "GPU memory capped at 24 GiB of 140.0 GiB on cuda:0 (train.gpu_memory_cap_gib)"


def on_two_gloo_ranks(fn, tmp_path) -> dict:
    """Run fn(rank, port, out) on two spawned CPU processes; returns what rank 0 wrote to `out` (JSON)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "result.json"
    mp.spawn(fn, args=(port, str(out)), nprocs=2)
    return json.loads(out.read_text())


def _sharded_head_loss(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: the LM head sharded as its own FSDP2 unit (vocabulary 67: 34 + 33 rows) and the
    loss from causal_lm_loss, each rank with its own number of tokens; against the same model unsharded."""
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_lab import sharded_loss
    from qlora_lab.pipelines.train import full_adapter_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    sharded_loss.CHUNK_ELEMENTS = 67 * 5  # several chunks of 5 tokens

    def build():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=67,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
        lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        return get_peft_model(LlamaForCausalLM(config), lora)

    batches = [torch.arange(12).reshape(2, 6) * 5 % 67, torch.arange(9).reshape(1, 9) * 7 % 67]
    labels = [b.clone() for b in batches]
    labels[0][0, :2] = -100  # ignored targets (a prompt)
    # one process with both ranks' batches: each rank's loss, and the ranks' mean gradient (what FSDP keeps)
    whole = build()
    losses, grads = [], []
    for ids, lab in zip(batches, labels, strict=True):
        whole.zero_grad()
        loss = whole(input_ids=ids, labels=lab).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in whole.named_parameters() if p.requires_grad})
    mean_grad = {n: (grads[0][n] + grads[1][n]) / 2 for n in grads[0]}

    model = build()
    causal_lm = model.get_base_model()
    applied = sharded_loss.use_sharded_head_loss(model)
    unsharded = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    mesh = init_device_mesh("cpu", (2,))
    for layer in causal_lm.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(causal_lm.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # every adapter tensor is now a shard; what is saved must be the whole, unsharded tensors
    all_sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
    gathered = full_adapter_state(model)
    gathered_whole = gathered.keys() == unsharded.keys() and all(
        torch.equal(gathered[k], unsharded[k]) for k in unsharded
    )
    loss = model(input_ids=batches[rank], labels=labels[rank]).loss
    head_sharded_in_step = type(causal_lm.lm_head.weight).__name__ == "DTensor"
    loss.backward()
    both = [None, None]
    dist.all_gather_object(both, loss.item())
    got = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # without labels: the logits, through the LM head
        logits = model(input_ids=batches[0]).logits
        expected = whole(input_ids=batches[0]).logits
    if rank == 0:
        Path(out).write_text(
            json.dumps(
                {
                    "adapter_gathered_whole": all_sharded and gathered_whole,
                    "applied": applied,
                    "losses_differ": max(abs(a - b) for a, b in zip(both, losses, strict=True)),
                    "grads_differ": max((got[n] - mean_grad[n]).abs().max().item() for n in got),
                    "grads": len(got),
                    "head_sharded_in_step": head_sharded_in_step,
                    "logits_differ": (logits - expected).abs().max().item(),
                }
            )
        )
    dist.destroy_process_group()


def test_fsdp2_loss_over_the_sharded_lm_head(tmp_path):
    """Under FSDP2 the loss never gathers the LM head (on 70B the whole head was 1.96 GiB over a 24 GiB card):
    each rank's loss and the averaged adapter gradients equal the unsharded model's, with uneven shards of the
    vocabulary and a different number of tokens on each rank."""
    result = on_two_gloo_ranks(_sharded_head_loss, tmp_path)
    assert result["adapter_gathered_whole"]  # the adapter saved under FSDP2: gathered whole, exactly
    assert result["applied"] and result["head_sharded_in_step"] and result["grads"] == 28
    assert result["losses_differ"] < 1e-5 and result["grads_differ"] < 1e-5 and result["logits_differ"] < 1e-5


def _sharded_against_whole(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks under FSDP: the tiny model in nf4, then fp4 (one process group for both, to spare
    a second pair of processes), loaded shard by shard (sharded_loading) against the same checkpoint loaded
    whole on this rank as one process loads it (load_model + attach_lora), both from seed 42."""
    import gc

    import bitsandbytes as bnb
    import torch
    import torch.distributed as dist
    import torch.distributed.fsdp as fsdp
    from transformers import set_seed

    from qlora_lab.models import attach_lora, load_model, model_path
    from qlora_lab.pipelines.train import full_adapter_state
    from qlora_lab.sharded_loading import load_sharded

    from .conftest import make_cfg

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        ACCELERATE_USE_FSDP="true",
    )
    torch.set_num_threads(1)

    def one(quant: str) -> dict:
        cfg = make_cfg(
            [
                *TINY,
                f"quantization={quant}",
                "lora.dropout=0",
                f"paths.cache_dir={Path(out).parent / 'cache'}",
            ]
        )
        # the random checkpoint, built once (under a file lock) by whichever rank comes first
        path = model_path(cfg)

        def whole_4bit_weights() -> int:
            gc.collect()
            return sum(isinstance(o, bnb.nn.Params4bit) and not o.is_meta for o in gc.get_objects())

        alive, fully_shard = [], fsdp.fully_shard

        # how many whole 4-bit weights exist as each unit is sharded
        def counting_fully_shard(module, **kwargs):
            alive.append(whole_4bit_weights())
            return fully_shard(module, **kwargs)

        fsdp.fully_shard = counting_fully_shard
        set_seed(42)
        sharded, _, (trainable, total) = load_sharded(path, cfg)
        fsdp.fully_shard = fully_shard
        whole_left = whole_4bit_weights()  # each whole 4-bit weight was freed once its layer was sharded
        set_seed(42)
        whole = attach_lora(load_model(path, cfg), cfg)

        def local_4bit_bytes(model) -> int:
            return sum(
                (w.to_local() if hasattr(w, "to_local") else w).untyped_storage().nbytes()
                for m in model.modules()
                if isinstance(m, bnb.nn.Linear4bit)
                for w in [m.weight]
            )

        lora = [(n, p) for n, p in sharded.named_parameters() if p.requires_grad]
        whole_start = {n: p.detach().clone() for n, p in whole.named_parameters() if p.requires_grad}
        sharded_start = full_adapter_state(sharded)
        result = {
            "most_whole_4bit_weights": max(alive),  # one decoder layer's 7 linear layers (the model has 14)
            "whole_4bit_weights_left": whole_left,
            "bytes_ratio": local_4bit_bytes(sharded) / local_4bit_bytes(whole),
            "params": [trainable, total] == list(whole.get_nb_trainable_parameters()),
            "lora_is_fsdp": all(type(p).__name__ == "DTensor" for _, p in lora)
            and len(lora) == len(whole_start),
            "same_lora_init": sharded_start.keys() == whole_start.keys()
            and all(torch.equal(sharded_start[k], whole_start[k]) for k in whole_start),
        }
        # the same batch on both ranks: FSDP's averaged gradient is then one process's gradient on that batch
        ids = torch.arange(48).reshape(2, 24) * 7 % 5000 + 100
        with torch.no_grad():
            result["max_logit_diff"] = (
                (sharded(input_ids=ids).logits - whole(input_ids=ids).logits).abs().max().item()
            )
        losses = {"sharded": [], "whole": []}
        for name, model in (("sharded", sharded), ("whole", whole)):
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=5e-3)
            for step in range(3):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                if name == "sharded" and step == 0:
                    grads = [p.grad for p in params]
                    result["lora_grads"] = all(g is not None for g in grads) and all(
                        g.full_tensor().abs().sum() > 0
                        for (n, _), g in zip(lora, grads, strict=True)
                        if "lora_B" in n
                    )
                opt.step()
                opt.zero_grad()
                losses[name].append(loss.item())
        result["max_loss_diff"] = max(
            abs(a - b) for a, b in zip(losses["sharded"], losses["whole"], strict=True)
        )
        result["loss_moved"] = losses["sharded"][-1] < losses["sharded"][0]
        adapter = full_adapter_state(sharded)
        trained = {n: p.detach() for n, p in whole.named_parameters() if p.requires_grad}
        result["adapter_max_diff"] = max((adapter[k] - trained[k]).abs().max().item() for k in trained)
        if rank == 0:
            sharded.save_pretrained(Path(out).parent / quant / "adapter", state_dict=adapter)
        return result

    results = {quant: one(quant) for quant in ("nf4", "fp4")}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def test_fsdp_sharded_loading_matches_whole_loading(tmp_path):
    """FSDP + 4-bit (nf4 and fp4) loads shard by shard: each rank holds half the 4-bit weights, with the
    logits, LoRA initialisation, per-step losses and trained adapter of the model loaded whole (fp32 on a CPU:
    to 1e-5), the adapter FSDP-managed and trained, and saved whole as a normal PEFT folder."""
    from safetensors.torch import load_file

    results = on_two_gloo_ranks(_sharded_against_whole, tmp_path)
    assert list(results) == ["nf4", "fp4"]
    for quant, result in results.items():
        assert result.pop("bytes_ratio") == pytest.approx(0.5, abs=0.01), quant
        assert result.pop("max_logit_diff") < 1e-5, quant
        assert result.pop("max_loss_diff") < 1e-5, quant
        assert result.pop("adapter_max_diff") < 1e-5, quant
        assert result == {
            "most_whole_4bit_weights": 7,
            "whole_4bit_weights_left": 0,
            "params": True,
            "lora_is_fsdp": True,
            "same_lora_init": True,
            "lora_grads": True,
            "loss_moved": True,
        }, quant
        adapter = tmp_path / quant / "adapter"
        saved = load_file(adapter / "adapter_model.safetensors")
        assert len(saved) == 28 and all(
            t.shape[0] in (16, 64, 128) or t.shape[1] == 16 for t in saved.values()
        )
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16


@pytest.mark.parametrize("num_items", [None, 7])
def test_loss_in_vocabulary_chunks_is_transformers_causal_lm_loss(monkeypatch, num_items):
    """One process, the head whole, logits in chunks of 3 tokens: transformers' loss and input gradient
    (ignored targets, a mean or a sum over num_items_in_batch), and what bf16 computes within bf16's step."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from qlora_lab import sharded_loss

    monkeypatch.setattr(sharded_loss, "CHUNK_ELEMENTS", 50 * 3)
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 5, 16), torch.randn(50, 16)
    labels = torch.randint(0, 50, (2, 5))
    labels[0, :2] = -100
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        h = hidden.to(dtype).clone().requires_grad_()
        got = sharded_loss.causal_lm_loss(h, weight.to(dtype), labels, num_items)
        got.backward()
        ref_h = hidden.to(dtype).clone().requires_grad_()
        expected = ForCausalLMLoss(ref_h @ weight.to(dtype).T, labels, 50, num_items)
        expected.backward()
        assert abs(got.item() - expected.item()) < tolerance, dtype
        assert torch.allclose(h.grad.float(), ref_h.grad.float(), atol=tolerance), dtype


def _random_in_memory(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks under FSDP: the tiny nf4 model with its random weights drawn in memory, twice."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from transformers.loss.loss_utils import ForCausalLMLoss

    from qlora_lab import sharded_loss
    from qlora_lab.sharded_loading import load_sharded

    from .conftest import make_cfg

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        ACCELERATE_USE_FSDP="true",
    )
    torch.set_num_threads(1)
    # untied, as Llama-3: the embedding and the LM head are sharded on their own
    tiny = [
        *TINY,
        "quantization=nf4",
        "model.random_in_memory=true",
        "model.random_init.tie_word_embeddings=false",
    ]
    cfg = make_cfg(tiny)
    ids = torch.arange(48).reshape(2, 24) * 7 % 5000 + 100
    logits = []
    for _ in range(2):
        model, _, _ = load_sharded(None, cfg)
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    # the loss over the LM head's shards (its own FSDP unit, which the training forward never gathers) equals
    # the loss of the logits the whole head gives
    causal_lm = model.get_base_model()
    sharded_loss.use_sharded_head_loss(model)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
        head_left_sharded = type(causal_lm.lm_head.weight).__name__ == "DTensor"
        whole_head_logits = model(input_ids=ids).logits
    expected = ForCausalLMLoss(whole_head_logits, ids, whole_head_logits.shape[-1])
    same_loss = abs(loss.item() - expected.item()) < 1e-5
    for module in model.modules():  # the tail group stays unsharded after a forward
        if isinstance(module, FSDPModule):
            module.reshard()
    embedding = causal_lm.get_input_embeddings().weight.full_tensor()
    norm = causal_lm.model.norm.weight.full_tensor()
    # each rank dequantizes the gathered 4-bit weights with its own quantization state: the two agree only if
    # every rank drew the same weights
    both = [None, None]
    dist.all_gather_object(both, logits[0])
    if rank == 0:
        Path(out).write_text(
            json.dumps(
                {
                    "same_on_both_ranks": bool(torch.equal(both[0], both[1])),
                    "same_when_drawn_again": bool(torch.equal(logits[0], logits[1])),
                    "embedding_std": round(embedding.std().item(), 3),
                    "norms_ones": bool(torch.equal(norm, torch.ones_like(norm))),
                    "finite": bool(logits[0].isfinite().all()),
                    "untied": causal_lm.lm_head.weight is not causal_lm.get_input_embeddings().weight,
                    "loss_over_the_head_shards": same_loss and head_left_sharded,
                }
            )
        )
    dist.destroy_process_group()


def test_fsdp_random_weights_drawn_in_memory_per_layer(tmp_path):
    """model.random_in_memory: no checkpoint folder; every rank draws the same weights (as transformers
    initialises the architecture: N(0, 0.02) matrices, ones for the norms), the same again on every load.
    Untied LM head: the training loss reads its shards, and equals the whole head's."""
    assert on_two_gloo_ranks(_random_in_memory, tmp_path) == {
        "same_on_both_ranks": True,
        "same_when_drawn_again": True,
        "embedding_std": 0.02,
        "norms_ones": True,
        "finite": True,
        "untied": True,
        "loss_over_the_head_shards": True,
    }
