"""Files a benchmark run writes: results.json and results.csv (one row per case and mode),
results.md (a table per suite and mode with mmfast's speedup over each baseline measured in
the same run) and <suite>.png (median time per group and provider)."""
from __future__ import annotations

import csv
import json
import os
from collections import defaultdict

COLUMNS = ["suite", "group", "provider", "mode", "status", "median_ms", "p20_ms", "p80_ms", "tflops", "gbps",
           "peak_memory_mb", "repeats"]


def speedups(rows: list[dict]) -> dict:
    """(suite, group, mode, provider) -> baseline median / mmfast median, for baseline rows."""
    mmfast = {(r["suite"], r["group"], r["mode"]): r["median_ms"]
              for r in rows if r["is_mmfast"] and r["status"] == "ok"}
    ratios = {}
    for r in rows:
        key = (r["suite"], r["group"], r["mode"])
        if not r["is_mmfast"] and r["status"] == "ok" and key in mmfast:
            ratios[key + (r["provider"],)] = r["median_ms"] / mmfast[key]
    return ratios


def _number(value, digits=3):
    if value is None:
        return ""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict]) -> str:
    ratios = speedups(rows)
    header = rows[0] if rows else {}
    lines = [f"# mmfast benchmarks ({header.get('profile')} profile)", "",
             f"Device: {header.get('gpu') or header.get('cpu')} ({header.get('device')}); torch {header.get('torch')}, "
             f"triton {header.get('triton')}, commit {header.get('git_commit')}, {header.get('timestamp')}.",
             "Speedup: the baseline's median time divided by mmfast's, same group and mode, same run.", ""]
    tables = defaultdict(list)
    for r in rows:
        tables[(r["suite"], r["mode"])].append(r)
    for (suite, mode), table in tables.items():
        rate_names = sorted({key for r in table for key in r.get("rate_names", [])})
        lines += [f"## {suite}, {mode}", "",
                  "| group | provider | median ms (p20-p80) | TFLOP/s | GB/s | peak MB | mmfast speedup |"
                  + "".join(f" {name} |" for name in rate_names),
                  "| --- | --- | --- | --- | --- | --- | --- |" + " --- |" * len(rate_names)]
        for r in table:
            if r["status"] != "ok":
                lines.append(f"| {r['group']} | {r['provider']} | {r['status']} | | | | |")
                continue
            ratio = ratios.get((suite, r["group"], mode, r["provider"]))
            lines.append(
                f"| {r['group']} | {r['provider']} | {_number(r['median_ms'])} "
                f"({_number(r.get('p20_ms'))}-{_number(r.get('p80_ms'))}) | {_number(r.get('tflops'))} | "
                f"{_number(r.get('gbps'))} | {_number(r.get('peak_memory_mb'), 4)} | "
                f"{'' if ratio is None else f'{ratio:.2f}x'} |"
                + "".join(f" {_number(r.get(name), 4)} |" for name in rate_names))
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], suite: str, path: str) -> bool:
    """Grouped bars of the median time (log scale), one panel per mode. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if r["suite"] == suite and r["status"] == "ok"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    if not modes:
        return False
    groups = list(dict.fromkeys(r["group"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    figure, axes = plt.subplots(len(modes), 1, figsize=(max(6, 1.3 * len(groups)) + 2.5, 3.2 * len(modes)), squeeze=False)
    width = 0.8 / len(providers)
    for axis, mode in zip(axes[:, 0], modes):
        for index, provider in enumerate(providers):
            times = {r["group"]: r["median_ms"] for r in rows if r["mode"] == mode and r["provider"] == provider}
            positions = [g + index * width for g, group in enumerate(groups) if group in times]
            axis.bar(positions, [times[group] for group in groups if group in times], width, label=provider)
        axis.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, rotation=20, ha="right",
                        fontsize=8)
        axis.set_yscale("log")
        axis.set_ylabel("median ms")
        axis.set_title(f"{suite}: {mode}")
        axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never on them
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write(rows: list[dict], directory: str) -> list[str]:
    """Writes every file into `directory`; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, name) for name in ("results.json", "results.csv", "results.md")]
    with open(paths[0], "w") as handle:
        json.dump(rows, handle, indent=1)
    fields = COLUMNS + sorted({key for r in rows for key in r} - set(COLUMNS))
    with open(paths[1], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    with open(paths[2], "w") as handle:
        handle.write(markdown(rows))
    for suite in dict.fromkeys(r["suite"] for r in rows):
        path = os.path.join(directory, f"{suite}.png")
        if plot(rows, suite, path):
            paths.append(path)
    return paths
