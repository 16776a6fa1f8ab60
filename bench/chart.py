"""The PNG chart: throughput and added latency per target."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scenarios import SCENARIO_NAMES


def draw(results: dict[str, Any], summary: dict[str, Any], path: Path) -> Path | None:
    """Write the chart; None (and a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install -e '.[bench]')")
        return None
    targets = list(results["targets"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8.5))

    ran = {key.split("/", 1)[1] for key in summary["load"]}
    scenarios = [s for s in SCENARIO_NAMES if s in ran]
    width = 0.8 / len(scenarios)
    for i, scenario in enumerate(scenarios):
        medians, lows, highs = [], [], []
        for target in targets:
            s = summary["load"].get(f"{target}/{scenario}", {}).get("rps")
            m = s["median"] if s else 0.0
            medians.append(m)
            lows.append(m - s["min"] if s else 0.0)
            highs.append(s["max"] - m if s else 0.0)
        xs = [x + (i - len(scenarios) / 2 + 0.5) * width for x in range(len(targets))]
        top.bar(xs, medians, width, yerr=[lows, highs], label=scenario, capsize=2)
    top.set_yscale("log")
    top.set_ylabel("requests/s (log scale)")
    top.set_title("Throughput per target (median, min-max bars)")
    top.set_xticks(range(len(targets)), targets)
    top.legend(ncol=5, fontsize=8)
    top.grid(axis="y", alpha=0.3)

    gateways = [t for t in targets if t != "direct"]
    for i, (field, label) in enumerate(
        [("chat_p50_ms", "added p50, chat"), ("ttfe_p50_ms", "added time to first event")]
    ):
        values, lows, highs = [], [], []
        for target in gateways:
            s = summary["added"].get(target, {}).get(field)
            m = max(s["median"], 0.0) if s else 0.0
            values.append(m)
            lows.append(min(m, m - s["min"]) if s else 0.0)
            highs.append(max(0.0, s["max"] - m) if s else 0.0)
        xs = [x + (i - 0.5) * 0.38 for x in range(len(gateways))]
        bars = bottom.bar(xs, values, 0.38, yerr=[lows, highs], label=label, capsize=2)
        bottom.bar_label(bars, fmt="%.2f", fontsize=7)
    bottom.set_ylabel("ms added over direct, 1 connection")
    bottom.set_title("Latency the gateway adds (median, min-max bars)")
    bottom.set_xticks(range(len(gateways)), gateways)
    bottom.legend(fontsize=8)
    bottom.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
