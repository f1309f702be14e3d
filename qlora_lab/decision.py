"""The LoRA-vs-QLoRA decision of a sweep: mean and 95% interval of every figure over the seeds of a cell, the
paired difference between QLoRA and LoRA jobs that share a seed (and so the data subset and order), and the
card (decision.md + decision.png) that says, per data size, whether QLoRA's eval-loss gap is within noise and
what it saves in memory and costs in time. A verdict is printed only where at least two pairs give an
interval. With sweep.equal_memory the card also sets QLoRA at LoRA's measured peak (a larger batch) beside
equal batch, and its headline says what that buys in tokens/s and time to target against LoRA's.

Rows are those of qlora_lab.report.collect: one per job, with `cell` (data size and any other varied setting,
the seed left out), `seed`, `quantization` and the metrics.
"""

from __future__ import annotations

import math
from pathlib import Path

MIN_PAIRS = 2  # fewer pairs give no interval, so no verdict
DECISION_PLOT = "decision.png"
CURVES_PLOT = "learning_curves.png"
TARGET_GAP = 0.02  # target eval loss: LoRA's final eval loss at that cell (mean over seeds) + 2%
# repeats table: summary column -> label
FIGURES = [
    ("eval_loss", "eval loss", 4),
    ("eval_accuracy", "accuracy", 2),
    ("tokens_per_s", "tokens/s", 0),
    ("peak_gib", "peak GiB", 2),
    ("train_s", "train s", 1),
    ("wall_s", "wall s", 1),
]


def interval(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and the half-width of its 95% Student-t interval; (mean, None) for one value, (None, None) for
    none."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))


def mode(quantization: str) -> str:
    return "LoRA" if quantization == "none" else f"QLoRA {quantization}"


def _size_key(cell_rows: list[dict]):
    size = cell_rows[0]["dataset_size"]
    return (size is None, size or 0, cell_rows[0]["cell"])


def cells(rows: list[dict]) -> list[list[dict]]:
    """Completed jobs by cell, in data-size order; the equal-memory jobs are not among them
    (equal_memory_section)."""
    by_cell: dict[str, list[dict]] = {}
    for r in rows:
        if r["status"] == "completed" and not r.get("equal_memory"):
            by_cell.setdefault(r["cell"], []).append(r)
    return sorted(by_cell.values(), key=_size_key)


def pm(mean: float | None, half: float | None, digits: int) -> str:
    if mean is None:
        return "–"
    return f"{mean:,.{digits}f}" + (f" ± {half:,.{digits}f}" if half is not None else "")


def repeats_section(rows: list[dict]) -> list[str]:
    """Mean ± 95% interval over the seeds of each cell and mode; empty when no cell ran more than one seed."""
    groups = [
        (cell, q, [r for r in cell if r["quantization"] == q])
        for cell in cells(rows)
        for q in sorted({r["quantization"] for r in cell}, key=lambda q: (q != "none", q))
    ]
    if not any(len(jobs) > 1 for _, _, jobs in groups):
        return []
    figures = [f for f in FIGURES if any(r[f[0]] is not None for r in rows)]
    lines = [
        "## Over the seeds (mean ± 95% interval)",
        "",
        "| data size | mode | seeds | " + " | ".join(label for _, label, _ in figures) + " |",
        "| --- | --- | ---: |" + " ---: |" * len(figures),
    ]
    for cell, q, jobs in groups:
        lines.append(
            f"| {cell[0]['cell']} | {mode(q)} | {len(jobs)} | "
            + " | ".join(pm(*interval([r[k] for r in jobs]), digits) for k, _, digits in figures)
            + " |"
        )
    return lines + [
        "",
        "± is the half-width of the 95% Student-t interval of the mean over the seeds "
        "(none for a single seed).",
        "",
    ]


def pairs(cell: list[dict], q: str) -> list[tuple[dict, dict]]:
    """(LoRA job, QLoRA job) of each seed that both modes completed in this cell."""
    lora = {r["seed"]: r for r in cell if r["quantization"] == "none"}
    return [
        (lora[r["seed"]], r)
        for r in sorted(cell, key=lambda r: r["seed"])
        if r["quantization"] == q and r["seed"] in lora
    ]


def compare(cell: list[dict], q: str) -> dict:
    """The paired figures of one cell and quantized mode."""
    ps = pairs(cell, q)
    gap, gap_half = interval(
        [
            b["eval_loss"] - a["eval_loss"]
            for a, b in ps
            if a["eval_loss"] is not None and b["eval_loss"] is not None
        ]
    )
    saved, saved_half = interval(
        [
            a["peak_gib"] - b["peak_gib"]
            for a, b in ps
            if a["peak_gib"] is not None and b["peak_gib"] is not None
        ]
    )
    lora_peak, _ = interval([a["peak_gib"] for a, _ in ps])
    # training time, not the job's wall time: that also holds model conversion, loading and the evaluate stage
    time, time_half = interval(
        [b["train_s"] / a["train_s"] - 1 for a, b in ps if a["train_s"] and b["train_s"]]
    )
    if len(ps) < MIN_PAIRS or gap_half is None:
        verdict = "no verdict (fewer than 2 seeds)" if ps else "no verdict (no pair)"
    elif gap - gap_half <= 0 <= gap + gap_half:
        verdict = "within noise"
    else:
        verdict = "worse" if gap > 0 else "better"
    return {
        "cell": cell[0]["cell"],
        "size": cell[0]["dataset_size"],
        "mode": q,
        "pairs": ps,
        "verdict": verdict,
        "gap": gap,
        "gap_half": gap_half,
        "saved_gib": saved,
        "saved_half": saved_half,
        "saved_pct": 100 * saved / lora_peak if saved is not None and lora_peak else None,
        "time_pct": None if time is None else 100 * time,
        "time_half": None if time_half is None else 100 * time_half,
    }


def comparisons(rows: list[dict]) -> list[dict]:
    quantized = sorted(
        {r["quantization"] for r in rows if r["status"] == "completed" and r["quantization"] != "none"}
    )
    return [compare(cell, q) for q in quantized for cell in cells(rows)]


def links(jobs: list[dict]) -> str:
    """Markdown links to the job folders (relative: the report lies in the sweep dir), named by job number."""
    return " ".join(f"[{r['job'].split('_', 1)[0]}](<{r['job']}>)" for r in jobs)


def headline(found: list[dict], rows: list[dict]) -> list[str]:
    """One sentence per quantized mode: what it saves and costs, and from which data size its loss is within
    noise."""
    done = [r for r in rows if r["status"] == "completed"]
    first = done[0]
    hw = first["_info"].get("hardware", {})
    where = (
        f"{first['model']} on {first['dataset']}, "
        f"{hw.get('gpu') or (hw.get('device') or 'unknown device').upper()}"
    )
    lines = []
    for q in sorted({c["mode"] for c in found}):
        mine = [c for c in found if c["mode"] == q and c["pairs"]]
        if not mine:
            lines.append(
                f"{where}: no cell completed both LoRA and {mode(q)} with the same seed: no verdict."
            )
            continue
        every = [p for c in mine for p in c["pairs"]]
        saved, _ = interval(
            [a["peak_gib"] - b["peak_gib"] for a, b in every if a["peak_gib"] and b["peak_gib"]]
        )
        lora_peak, _ = interval([a["peak_gib"] for a, _ in every])
        time, _ = interval(
            [b["train_s"] / a["train_s"] - 1 for a, b in every if a["train_s"] and b["train_s"]]
        )
        costs = []
        if saved is not None and lora_peak:
            costs.append(
                f"{'saves' if saved >= 0 else 'needs'} {abs(saved):.2f} GiB {'of' if saved >= 0 else 'more'} "
                f"peak memory ({-100 * saved / lora_peak:+.0f}%)"
            )
        if time is not None:
            costs.append(f"{'costs' if time >= 0 else 'saves'} {abs(100 * time):.0f}% training time")
        text = f"{where}: {mode(q)} " + " and ".join(costs) + " (means over all pairs); "
        judged = [c for c in mine if not c["verdict"].startswith("no verdict")]
        if len(judged) < len(mine):
            text += (
                f"its eval loss gets no verdict: {len(mine) - len(judged)} of {len(mine)} cells have fewer "
                f"than {MIN_PAIRS} seeds (run the sweep with sweep.repeats=3 or more)."
            )
        elif len({c["cell"] for c in mine}) != len({c["size"] for c in mine}):
            text += "its eval loss per cell: see the table (cells differ in more than data size)."
        else:
            tail = []  # the largest sizes, all within noise
            for c in reversed(mine):
                if c["verdict"] != "within noise":
                    break
                tail.append(c)
            if len(tail) == len(mine):
                text += (
                    "its eval loss is within noise of LoRA's at every data size "
                    f"({', '.join(c['cell'] for c in mine)})."
                )
            else:
                below = mine[len(mine) - len(tail) - 1]
                text += (
                    f"its eval loss is within noise of LoRA's from {tail[-1]['cell']} examples on; "
                    if tail
                    else "its eval loss is not within noise of LoRA's at any data size; "
                )
                text += (
                    f"at {below['cell']} it is {below['verdict']} by {abs(below['gap']):.4f} ± "
                    f"{below['gap_half']:.4f}."
                )
        lines.append(text)
    return lines


def signed_pct(values: list[float]) -> str:
    mean, half = interval(values)
    return "–" if mean is None else f"{mean:+.0f}%" + (f" ± {half:.0f}%" if half is not None else "")


def spent_pairs(rows: list[dict], q: str) -> list[tuple[dict, dict | None, dict]]:
    """(LoRA job, QLoRA job at LoRA's batch or None, QLoRA job at equal memory) for each completed
    equal-memory job of mode q whose LoRA job (same cell and seed) completed."""
    done = [r for r in rows if r["status"] == "completed"]

    def twin(job: dict, quantization: str) -> dict | None:
        return next(
            (
                r
                for r in done
                if not r.get("equal_memory")
                and (r["quantization"], r["cell"], r["seed"]) == (quantization, job["cell"], job["seed"])
            ),
            None,
        )

    spent = [r for r in done if r.get("equal_memory") and r["quantization"] == q]
    return [(twin(r, "none"), twin(r, q), r) for r in spent if twin(r, "none")]


def equal_memory_headline(rows: list[dict], gap: float = TARGET_GAP) -> list[str]:
    """sweep.equal_memory: one sentence per quantized mode on what its saved memory buys (the batch found
    under LoRA's peak, tokens/s and training seconds to the target against LoRA's, paired by data size and
    seed)."""
    targets = {}
    for cell in cells(rows):
        lora_final, _ = interval([r["eval_loss"] for r in cell if r["quantization"] == "none"])
        if lora_final is not None:
            targets[cell[0]["cell"]] = lora_final * (1 + gap)
    lines = []
    for q in sorted({r["quantization"] for r in rows if r.get("equal_memory")}):
        ps = spent_pairs(rows, q)
        if not ps:
            lines.append(
                f"At equal memory: no {mode(q)} job completed with train.batch_size=auto under its LoRA "
                "job's peak (see the equal-memory table), so there is nothing to compare."
            )
            continue
        lora_batch = sorted({a["batch_size_used"] or a["batch_size"] for a, _, _ in ps})
        found = sorted({c["batch_size_used"] for _, _, c in ps if c["batch_size_used"]})
        text = (
            f"At equal memory ({mode(q)} with train.batch_size=auto under its LoRA job's peak; {len(ps)} "
            f"{'pairs' if len(ps) > 1 else 'pair'} by data size and seed, "
            + ("means ± their 95% interval" if len(ps) >= MIN_PAIRS else "no interval")
            + f"): batch {', '.join(map(str, found)) or '?'} against LoRA's {', '.join(map(str, lora_batch))}"
        )
        if not any((c["batch_size_used"] or 0) > (a["batch_size_used"] or a["batch_size"]) for a, _, c in ps):
            text += " (no larger batch fit, so here its saved memory bought no larger batch)"
        unbound = [
            c for _, _, c in ps if not c["_batch_over_cap"] and c["batch_size_used"] == c["_auto_batch_start"]
        ]
        if unbound:
            text += (
                f" ({len(unbound)} of {len(ps)} kept the search's first batch, train.auto_batch_start: the "
                "cap did not bind, so a larger batch may fit)"
            )
        speed = [
            c["tokens_per_s"] / a["tokens_per_s"] - 1
            for a, _, c in ps
            if a["tokens_per_s"] and c["tokens_per_s"]
        ]
        at_batch = [
            b["tokens_per_s"] / a["tokens_per_s"] - 1
            for a, b, _ in ps
            if b and a["tokens_per_s"] and b["tokens_per_s"]
        ]
        if speed:
            text += f"; tokens/s {signed_pct([100 * v for v in speed])} against LoRA's"
            if at_batch:
                text += f" ({signed_pct([100 * v for v in at_batch])} at LoRA's batch)"
        faster, skipped = [], {}
        for a, _, c in ps:
            target = targets.get(c["cell"])
            if target is None or not a["_curve"] or not c["_curve"]:
                reason = "no learning curve (train.eval_steps)"
            else:
                hit_lora, hit = reach(a["_curve"], target), reach(c["_curve"], target)
                if hit is None:
                    reason = f"{mode(q)} at equal memory did not reach it"
                elif hit_lora is None:
                    reason = "LoRA did not reach it"
                elif hit_lora["train_s"] <= 0:
                    reason = "LoRA met it before training"
                else:
                    faster.append(100 * (hit["train_s"] / hit_lora["train_s"] - 1))
                    continue
            skipped[reason] = skipped.get(reason, 0) + 1
        if faster:
            text += (
                f"; training seconds to the target (LoRA's final eval loss + {100 * gap:g}%) "
                f"{signed_pct(faster)} against LoRA's"
            )
        if skipped:
            text += "; time to target not compared for " + ", ".join(
                f"{n} of {len(ps)} ({reason})" for reason, n in skipped.items()
            )
        lines.append(text + ".")
    return lines


def card(rows: list[dict]) -> str:
    """decision.md: the headline, then one row per cell with its verdict and the runs behind every figure."""
    done = [r for r in rows if r["status"] == "completed"]
    lines = ["## Decision: LoRA vs QLoRA", ""]
    if not done:
        return "\n".join(lines + ["No job completed: no verdict.", ""])
    modes = {r["quantization"] for r in done}
    if "none" not in modes or len(modes) < 2:
        only = ", ".join(mode(q) for q in sorted(modes))
        return "\n".join(
            lines
            + [
                f"This sweep completed only {only} jobs: there are no LoRA/QLoRA pairs, so no "
                f"verdict; sweep quantization=none,nf4 to compare them.",
                "",
            ]
        )
    found = comparisons(rows)
    spent = equal_memory_headline(rows)
    lines += headline(found, rows) + ([""] + spent if spent else [])
    if any(r["device"] == "cpu" for r in done):
        lines += [
            "",
            f"On a CPU the peaks{' (and the equal-memory cap)' if spent else ''} are the job process's peak "
            "RSS, "
            "not GPU memory: they do not say what QLoRA "
            f"saves{', or what its saving buys,' if spent else ''} on a GPU.",
        ]
    lines += [
        "",
        f"![decision]({DECISION_PLOT})",
        "",
        "| data size | mode | pairs | eval loss gap (QLoRA − LoRA) | verdict | memory saved GiB | peak "
        "memory | time cost | runs |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for c in found:
        pct = "–" if c["saved_pct"] is None else f"{-c['saved_pct']:+.0f}%"
        cost = (
            "–"
            if c["time_pct"] is None
            else f"{c['time_pct']:+.0f}%"
            + (f" ± {c['time_half']:.0f}%" if c["time_half"] is not None else "")
        )
        lines.append(
            f"| {c['cell']} | {mode(c['mode'])} | {len(c['pairs'])} | {pm(c['gap'], c['gap_half'], 4)} "
            f"| {c['verdict']} | {pm(c['saved_gib'], c['saved_half'], 2)} | {pct} | {cost} "
            f"| {links([r for pair in c['pairs'] for r in pair]) or '–'} |"
        )
    lines += equal_memory_section(rows)
    lines += [
        "",
        "Pairs: a LoRA and a QLoRA job of the same cell and seed (same data subset and order). Gap, memory "
        "saved and time cost are means of the per-pair differences (time cost: QLoRA's training time ÷ "
        "LoRA's − 1) ± the half-width of their 95% Student-t interval. Within noise: the gap's interval "
        f"holds 0; worse/better: it lies wholly above/below 0. Cells with fewer than {MIN_PAIRS} pairs get "
        "no interval and no verdict. Runs: the job folders of the pairs (LoRA, QLoRA per seed).",
        "",
    ]
    return "\n".join(lines)


def equal_memory_section(rows: list[dict], gap: float = TARGET_GAP) -> list[str]:
    """sweep.equal_memory: per data size, LoRA and QLoRA at LoRA's batch, and QLoRA with the batch it found
    under LoRA's measured peak: batch, peak, tokens/s and the time and tokens to the same target as
    target_section's."""
    spent = [r for r in rows if r.get("equal_memory") and r["status"] == "completed"]
    failed = [r for r in rows if r.get("equal_memory") and r["status"] != "completed"]
    if not spent and not failed:
        return []
    lines = [
        "",
        "### Equal memory: QLoRA spends what it saves on a larger batch",
        "",
        "| data size | mode | batch | peak GiB | memory cap GiB | tokens/s | reached target | tokens to "
        "target | train s to target | runs |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for cell in cells(rows):
        mine = [r for r in spent if r["cell"] == cell[0]["cell"]]
        if not mine:
            continue
        lora_final, _ = interval([r["eval_loss"] for r in cell if r["quantization"] == "none"])
        target = None if lora_final is None else lora_final * (1 + gap)
        groups = [("LoRA", [r for r in cell if r["quantization"] == "none"])]
        for q in sorted({r["quantization"] for r in mine}):
            groups += [
                (mode(q), [r for r in cell if r["quantization"] == q]),
                (f"{mode(q)} at equal memory", [r for r in mine if r["quantization"] == q]),
            ]
        for label, jobs in groups:
            batches = sorted({r["batch_size_used"] or r["batch_size"] for r in jobs})
            caps = [r["memory_cap_gib"] for r in jobs if r["memory_cap_gib"] is not None]
            hits = [reach(r["_curve"], target) for r in jobs if r["_curve"]] if target is not None else []
            got = [h for h in hits if h is not None]
            if got:
                reached = f"{len(got)} of {len(hits)}"
                at_start = sum(h["step"] == 0 for h in got)
                if at_start:  # the evaluation before training already met it, as in target_section
                    reached += f" ({at_start} before training)"
                to_target = (
                    f"{pm(*interval([h['tokens'] for h in got]), 0)} "
                    f"| {pm(*interval([h['train_s'] for h in got]), 1)}"
                )
            else:
                best = [p["loss"] for r in jobs for p in r["_curve"]]
                reached = f"not reached (best {min(best):.4f})" if hits and best else "–"
                to_target = "– | –"
            lines.append(
                f"| {cell[0]['cell']} | {label} | {', '.join(str(b) for b in batches)} "
                f"| {pm(*interval([r['peak_gib'] for r in jobs]), 2)} "
                f"| {pm(*interval(caps), 2) if caps else '–'} "
                f"| {pm(*interval([r['tokens_per_s'] for r in jobs]), 0)} | {reached} | {to_target} "
                f"| {links(jobs)} |"
            )
    if failed:
        lines += [
            "",
            f"{len(failed)} equal-memory jobs did not complete: "
            + "; ".join(
                f"{r['job'].split('_', 1)[0]}: {str(r['error'] or '?').splitlines()[0].rstrip('.')}"
                for r in failed
            )
            + ".",
        ]
    return lines + [
        "",
        "Equal memory: the QLoRA job again with train.batch_size=auto under train.memory_cap_gib = "
        "the peak its LoRA job (same data size and seed) measured; the batch it found is the largest "
        f"whose peak stayed under that cap. Target: LoRA's final eval loss + {100 * gap:g}%, as in "
        "the time-to-target table; train s counts the batch it kept only (the larger batches tried "
        "first are in the job's wall time). Mean ± 95% interval over the seeds. On a GPU the peak is "
        "the allocator's; on a CPU it is the process's peak RSS, so there the cap and the batch say "
        "little about memory.",
    ]


def has_pairs(rows: list[dict]) -> bool:
    return any(c["pairs"] for c in comparisons(rows))


def plot_title(rows: list[dict], equal_memory: bool) -> str:
    title = "QLoRA vs LoRA, paired by seed (error bars: 95% interval)"
    if not equal_memory:
        return title
    title += "; equal memory: QLoRA's batch_size=auto under LoRA's peak"
    if any(r["device"] == "cpu" for r in rows if r["status"] == "completed"):
        title += " (CPU: peaks are process RSS, not GPU memory)"
    return title


def plot(rows: list[dict], path: Path) -> bool:
    """decision.png: per cell, the eval-loss gap, the memory saved and the time cost with their intervals.
    Returns False (and removes an older plot) when there are no pairs to draw."""
    found = [c for c in comparisons(rows) if c["pairs"]]
    if not found:
        path.unlink(missing_ok=True)
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spent = {q: spent_pairs(rows, q) for q in sorted({c["mode"] for c in found})}
    spent = {q: ps for q, ps in spent.items() if ps}
    fig, axes = plt.subplots(1, 4 if spent else 3, figsize=(17 if spent else 13, 4))
    panels = [
        ("gap", "gap_half", "eval loss gap (QLoRA − LoRA)"),
        ("saved_gib", "saved_half", "peak memory saved (GiB)"),
        ("time_pct", "time_half", "training time cost (%)"),
    ]
    if spent:  # the fourth panel: tokens/s against LoRA's at LoRA's batch and at equal memory
        ax = axes[3]
        for q, ps in spent.items():
            series = (
                (f"{mode(q)}, LoRA's batch", [(a, b) for a, b, _ in ps]),
                (f"{mode(q)}, equal memory", [(a, c) for a, _, c in ps]),
            )
            for label, jobs in series:
                by_cell: dict[str, list[float]] = {}
                for lora, job in jobs:
                    if job and lora["tokens_per_s"] and job["tokens_per_s"]:
                        by_cell.setdefault(job["cell"], []).append(
                            100 * (job["tokens_per_s"] / lora["tokens_per_s"] - 1)
                        )
                points = [(cell, *interval(v)) for cell, v in by_cell.items()]
                ax.errorbar(
                    [c for c, _, _ in points],
                    [m for _, m, _ in points],
                    yerr=[h or 0 for _, _, h in points],
                    marker="o",
                    capsize=4,
                    label=label,
                )
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("training examples (dataset.size)")
        ax.set_ylabel("tokens/s against LoRA's (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax, (key, half, label) in zip(axes[:3], panels, strict=True):
        for q in sorted({c["mode"] for c in found}):
            mine = [c for c in found if c["mode"] == q and c[key] is not None]
            ax.errorbar(
                [c["cell"] for c in mine],
                [c[key] for c in mine],
                yerr=[c[half] or 0 for c in mine],
                marker="o",
                capsize=4,
                label=mode(q),
            )
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("training examples (dataset.size)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(plot_title(rows, bool(spent)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def reach(curve: list[dict], target: float) -> dict | None:
    """The first point of a learning curve at or below the target loss; None when the run never got there."""
    return next((p for p in curve if p["loss"] <= target), None)


def target_section(rows: list[dict], gap: float = TARGET_GAP) -> list[str]:
    """Tokens and training seconds each mode needs to reach LoRA's final eval loss (+ gap) at the same
    cell."""
    found = []
    for cell in cells(rows):
        lora_final, _ = interval([r["eval_loss"] for r in cell if r["quantization"] == "none"])
        if lora_final is None or not any(r["_curve"] for r in cell):
            continue
        target = lora_final * (1 + gap)
        for q in sorted({r["quantization"] for r in cell}, key=lambda q: (q != "none", q)):
            jobs = [r for r in cell if r["quantization"] == q and r["_curve"]]
            hits = [reach(r["_curve"], target) for r in jobs]
            got = [h for h in hits if h is not None]
            if got:
                tokens, tokens_half = interval([h["tokens"] for h in got])
                secs, secs_half = interval([h["train_s"] for h in got])
                reached = f"{len(got)} of {len(jobs)}"
                at_start = sum(h["step"] == 0 for h in got)
                if at_start:  # the evaluation before training already met it: the target says little here
                    reached += f" ({at_start} before training)"
                figures = f"{pm(tokens, tokens_half, 0)} | {pm(secs, secs_half, 1)}"
            else:
                best = min(p["loss"] for r in jobs for p in r["_curve"])
                reached, figures = f"not reached (best {best:.4f})", "– | –"
            found.append(
                f"| {cell[0]['cell']} | {mode(q)} | {target:.4f} | {reached} | {figures} | {links(jobs)} |"
            )
    if not found:
        return []
    return [
        f"## Time to target (LoRA's final eval loss + {100 * gap:g}%)",
        "",
        "| data size | mode | target loss | runs that reached it | tokens | train s | runs |",
        "| --- | --- | ---: | --- | ---: | ---: | --- |",
        *found,
        "",
        "Read from each run's learning curve (eval/curve: an evaluation before training, every "
        "train.eval_steps "
        "and at the end): the first evaluation at or below the target. Tokens: real tokens trained on by "
        "then; "
        "train s: seconds in optimizer steps by then (evaluation left out). Mean ± 95% interval over the "
        f"runs that reached it. Curves: `{CURVES_PLOT}`.",
        "",
    ]


def curves_plot(rows: list[dict], path: Path) -> bool:
    """learning_curves.png: eval loss against tokens (left) and training seconds (right), one row per cell,
    one line per job (colour: mode). Returns False (and removes an older plot) when no job recorded a
    curve."""
    groups = [cell for cell in cells(rows) if any(r["_curve"] for r in cell)]
    if not groups:
        path.unlink(missing_ok=True)
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["quantization"] for cell in groups for r in cell}, key=lambda q: (q != "none", q))
    colours = {q: f"C{i}" for i, q in enumerate(modes)}
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.2 * len(groups)), squeeze=False)
    for (left, right), cell in zip(axes, groups, strict=True):
        for r in cell:
            xs = r["_curve"]
            label = mode(r["quantization"])
            for ax, key in ((left, "tokens"), (right, "train_s")):
                ax.plot(
                    [p[key] for p in xs],
                    [p["loss"] for p in xs],
                    marker=".",
                    color=colours[r["quantization"]],
                    alpha=0.8,
                    label=label,
                )
        for ax, xlabel in ((left, "tokens trained on"), (right, "training seconds")):
            handles, labels = ax.get_legend_handles_labels()
            unique = dict(zip(labels, handles, strict=True))
            ax.legend(unique.values(), unique.keys())
            ax.set_xlabel(xlabel)
            ax.set_ylabel("eval loss")
            ax.set_title(f"data size {cell[0]['cell']}")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
