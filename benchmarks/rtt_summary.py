"""Summarise two_machines.sh runs: per added round trip, each system's speedup over HF generate and the
share of its 0 ms speedup it keeps.   python -m benchmarks.rtt_summary bench-results/two-machines/rtt-*.json"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def load(paths: list[str]) -> dict[float, dict[str, float]]:
    """rtt_ms → system → speedup over hf-generate."""
    table: dict[float, dict[str, float]] = {}
    for path in paths:
        rtt = float(re.search(r"rtt-([\d.]+)\.json$", path).group(1))
        systems = json.loads(Path(path).read_text())["systems"]
        table[rtt] = {s["system"]: s["ratio_to_hf_generate"] for s in systems}
    return dict(sorted(table.items()))


def main(paths: list[str]) -> None:
    table = load(paths)
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
