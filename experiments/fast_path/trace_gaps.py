"""Where a profiled training step's time goes on the GPU: busy and idle time per step, the idle gaps and
what the host was doing when each ended, and the kernels by device time (those replayed from CUDA graphs
apart).

Reads the Chrome trace that `train.profile=true` writes (profile_trace.json in the run folder):
    python experiments/fast_path/trace_gaps.py RUN_DIR/profile_trace.json [--gap-us 200]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json

GPU = ("kernel", "gpu_memcpy", "gpu_memset")
HOST = ("cpu_op", "user_annotation", "python_function")
SYNCS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",
    "cudaMemcpyAsync",
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--gap-us", type=float, default=200.0, help="list idle gaps longer than this")
    a = ap.parse_args()
    events = [e for e in json.load(open(a.trace))["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in GPU), key=lambda e: e["ts"])
    runtime = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})
    }
    host = sorted((e for e in events if e.get("cat") in HOST), key=lambda e: e["ts"])
    steps = sorted((e for e in events if e["name"].startswith("ProfilerStep#")), key=lambda e: e["ts"])
    starts = [e["ts"] for e in host]

    def enclosing(ts: float, tid) -> list[str]:
        """Host ops on thread `tid` running at time ts, outermost first."""
        i = bisect.bisect_right(starts, ts)
        found = [
            e for e in host[max(0, i - 4000) : i] if e["tid"] == tid and e["ts"] <= ts <= e["ts"] + e["dur"]
        ]
        return [e["name"][:70] for e in sorted(found, key=lambda e: (e["ts"], -e["dur"]))]

    for step in steps:
        t0, t1 = step["ts"], step["ts"] + step["dur"]
        inside = [e for e in gpu if t0 <= e["ts"] < t1]
        busy, gaps, end = 0.0, [], t0
        for e in inside:
            if e["ts"] > end:
                gaps.append((e["ts"] - end, end, e))
            busy += max(0.0, e["ts"] + e["dur"] - max(e["ts"], end))
            end = max(end, e["ts"] + e["dur"])
        if t1 > end:
            gaps.append((t1 - end, end, None))
        print(
            f"\n== {step['name']}: {step['dur'] / 1e3:.1f} ms, GPU busy {busy / 1e3:.1f} ms, "
            f"idle {(step['dur'] - busy) / 1e3:.1f} ms in {len(gaps)} gaps "
            f"({sum(g for g, _, _ in gaps if g > a.gap_us) / 1e3:.1f} ms in gaps > {a.gap_us:.0f} us)"
        )
        by_cause: dict[str, float] = collections.Counter()
        for g, _, nxt in gaps:
            launch = runtime.get(nxt["args"].get("correlation")) if nxt else None
            chain = enclosing(launch["ts"], launch["tid"]) if launch else ["(end of step)"]
            cause = " > ".join(chain[-3:]) + (f" > {launch['name']}" if launch else "")
            by_cause[cause] += g
        for cause, g in sorted(by_cause.items(), key=lambda kv: -kv[1])[:15]:
            print(f"  idle {g / 1e3:7.2f} ms before a launch in: {cause}")
        for g, at, nxt in sorted(gaps, key=lambda x: -x[0])[:8]:
            launch = runtime.get(nxt["args"].get("correlation")) if nxt else None
            chain = enclosing(launch["ts"], launch["tid"]) if launch else []
            ended_by = nxt["name"][:50] if nxt else "-"
            print(
                f"  gap {g / 1e3:6.2f} ms at +{(at - t0) / 1e3:6.1f} ms, ended by {ended_by}; "
                f"host: {' > '.join(chain[-5:])}"
            )
        syncs = collections.Counter()
        for e in events:
            if e.get("cat") == "cuda_runtime" and e["name"] in SYNCS and t0 <= e["ts"] < t1 and e["dur"] > 50:
                syncs[" > ".join(enclosing(e["ts"], e["tid"])[-3:]) + f" > {e['name']}"] += e["dur"]
        for where, d in syncs.most_common(8):
            print(f"  host waited {d / 1e3:6.2f} ms in {where}")
        kernels: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
        for e in inside:
            launch = runtime.get(e["args"].get("correlation"))
            graph = launch is not None and launch["name"].startswith("cudaGraphLaunch")
            k = kernels[("[graph] " if graph else "") + e["name"][:80]]
            k[0] += e["dur"]
            k[1] += 1
        in_graphs = sum(v[0] for n, v in kernels.items() if n.startswith("[graph]"))
        print(
            f"  device time in graph replays {in_graphs / 1e3:.1f} ms, "
            f"outside {(busy - in_graphs) / 1e3:.1f} ms"
        )
        for n, (d, c) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]:
            print(f"  {d / 1e3:7.2f} ms {c:5d}x  {n}")


if __name__ == "__main__":
    main()
