"""Plots throughput against the in-flight limit from bench-results/bench.json.

Usage: python3 deploy/bench/plot.py [bench-results]
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-results")
    results = json.loads((out / "bench.json").read_text())["results"]
    sweep = sorted(
        (r for r in results if r["latency"] == "fixed:200" and r["ordering"] == "key" and not r.get("paced_per_second")),
        key=lambda r: r["in_flight"],
    )
    if not sweep:
        print("no fixed:200 key-ordered scenarios to plot")
        return
    x = [r["in_flight"] for r in sweep]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, [r["throughput_records_per_s"] for r in sweep], "o-", label="measured (records/s)")
    ax.plot(x, [r["bound_records_per_s"] for r in sweep], "--", label="bound: in-flight ÷ mean LLM latency")
    for r in results:
        if r["ordering"] == "partition":
            ax.axhline(r["throughput_records_per_s"], color="grey", linestyle=":", label="one record at a time per partition")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x)
    ax.set_xticklabels([str(v) for v in x])
    ax.set_xlabel("in-flight limit (enricher.max_in_flight)")
    ax.set_ylabel("records per second, end to end")
    ax.set_title("Throughput against the in-flight limit (llm-sim fixed 200 ms, 16 partitions)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "throughput_vs_inflight.png"
    fig.savefig(path, dpi=110)
    print(f"[bench] plot in {path}")


if __name__ == "__main__":
    main()
