"""The multi-GPU table from the committed device calls: one row per run, against the one-GPU run of the same
call.

    python experiments/multi_gpu/summarize.py            # prints the README's table

Scaling efficiency = tokens/s ÷ (GPUs × the same call's one-GPU tokens/s). Loss agreement = the largest
difference between this run's per-step losses and those of the run it is compared with (same global batch,
same data order).
"""

import json
from pathlib import Path

HERE = Path(__file__).parent
# run -> the run of the same call whose per-step losses it should reproduce (same global batch of 4 rows)
COMPARE = {
    "ddp_b2": "single_b4",
    "fsdp_b2": "ddp_b2",
    "ddp_autocast": "ddp_b2",
    "single_b4": "ddp_b2",
    "fsdp_1b_liger": "fsdp_1b",
}


def rows(call: Path):
    runs = {
        r["run"]: r for r in map(json.loads, (call / "runs.jsonl").read_text().splitlines()) if "run" in r
    }
    one = runs.get("single_b2") or runs.get("single_1b") or runs.get("single_8b")
    ref_file = call / "reference.jsonl"
    reference = json.loads(ref_file.read_text().splitlines()[0]) if ref_file.is_file() else None
    for name, r in runs.items():
        if r.get("train/tokens_per_s") is None:
            continue
        gpus = r.get("distributed/world_size") or 1
        peak = max(r.get("memory/peak_gib_per_rank") or [r["memory/peak_gib"]])
        eff = (
            f"{r['train/tokens_per_s'] / (gpus * one['train/tokens_per_s']):.2f}"
            if one and gpus > 1 and "70b" not in name  # 70B has no one-GPU run to scale from
            else "n/a"
        )
        other = runs.get(COMPARE.get(name, ""))
        agree = "n/a"
        if other and r.get("train/losses") and other.get("train/losses"):
            diff = max(abs(a - b) for a, b in zip(r["train/losses"], other["train/losses"], strict=True))
            agree = f"{diff:.4f} vs {other['run']}"
        yield (
            f"| {call.name} | {name} | {gpus} | "
            f"{r.get('distributed/strategy') or ('ddp' if gpus > 1 else 'one process')} | "
            f"{r['train/batch_size']} | {r['train/tokens_per_s']:,.0f} | "
            f"{r['train/tokens_per_s_per_gpu']:,.0f} | {r['train/step_time_median_s']:.3f} | {eff} | "
            f"{peak:.2f} | {agree} | "
            + (
                f"{reference['tokens_per_s']:,} tok/s, {reference['peak_gib']} GiB |"
                if reference
                else "not run in this call |"
            )
        )


print(
    "| call | run | GPUs | strategy | batch per GPU | tokens/s | tokens/s per GPU | median step s | scaling "
    "efficiency | peak GiB per GPU | max per-step loss difference | reference loop, GPU 0, same call |"
)
print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
for call in sorted(p for p in HERE.iterdir() if (p / "runs.jsonl").is_file()):
    for row in rows(call):
        print(row)
