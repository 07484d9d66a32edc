"""Summarise two_machines.sh runs: per added round trip, each system's speedup over HF generate and the
share of its 0 ms speedup it keeps.   python -m benchmarks.rtt_summary bench-results/two-machines/rtt-*.json"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path


def load(paths: list[str], field: str = "ratio_to_hf_generate") -> dict[float, dict[str, float]]:
    """rtt_ms → system → that field of its summary (default: speedup over hf-generate)."""
    table: dict[float, dict[str, float]] = {}
    for path in paths:
        rtt = float(re.search(r"rtt-([\d.]+)\.json$", path).group(1))
        systems = json.loads(Path(path).read_text())["systems"]
        table[rtt] = {s["system"]: s[field] for s in systems if field in s}
    return dict(sorted(table.items()))


def load_first_tokens(paths: list[str]) -> dict[float, dict[str, list[dict]]]:
    """rtt_ms → system → its runs (prompt_index, ttft_s and, for duo, the first token's breakdown)."""
    table: dict[float, dict[str, list[dict]]] = {}
    for path in paths:
        rtt = float(re.search(r"rtt-([\d.]+)\.json$", path).group(1))
        table[rtt] = {s["system"]: s["runs"] for s in json.loads(Path(path).read_text())["systems"]}
    return dict(sorted(table.items()))


def main(paths: list[str]) -> None:
    print_speedups(load(paths))
    print()
    print_first_tokens(load_first_tokens(paths))


def print_first_tokens(table: dict[float, dict[str, list[dict]]]) -> None:
    """Median TTFT per round trip, and the median of duo's verifier link (the part of its first token spent
    between the drafter and the verifier, outside the verifier's queue and prefill): the link is crossed
    once before the first token, so it should grow by one round trip. The TTFTs themselves vary by tens of
    milliseconds from prompt to prompt and run to run (HF generate's too, which no round trip touches)."""
    systems = list(next(iter(table.values())))
    print(f"{'RTT ms':>7}" + "".join(f"{name:>20}" for name in systems))
    for rtt, row in table.items():
        cells = []
        for name in systems:
            runs = row.get(name, [])
            cell = f"{statistics.median(run['ttft_s'] for run in runs) * 1000:.0f}" if runs else "-"
            links = [run["first_token"]["verifier_link_s"] for run in runs if run.get("first_token")]
            if links:
                cell += f" (link {statistics.median(links) * 1000:.0f})"
            cells.append(cell)
        print(f"{rtt:>7.0f}" + "".join(f"{cell:>20}" for cell in cells))
    print("median TTFT in ms; (link: duo's median verifier link in ms, round trip included)")


def print_speedups(table: dict[float, dict[str, float]]) -> None:
    systems = [name for name in next(iter(table.values())) if name != "hf-generate"]
    base = table.get(0.0)
    print(f"{'RTT ms':>7}" + "".join(f"{name:>22}" for name in systems))
    for rtt, row in table.items():
        cells = []
        for name in systems:
            kept = f" ({row[name] / base[name]:.0%})" if base and rtt > 0 and base.get(name) else ""
            cells.append(f"{row[name]:>10.2f}×{kept:<11}")
        print(f"{rtt:>7.0f}" + "".join(f"{cell:>22}" for cell in cells))
    print("speedup over HF generate; (share of the 0 ms speedup kept)")


if __name__ == "__main__":
    main(sys.argv[1:])
