"""Compare evaluated runs: a markdown table in the layout of the paper's tables, one overlaid diagram.

    python -m timm_cskd.compare out/ce/eval-val out/cskd/eval-val --names CE CS-KD

Each RUN_DIR is a ``timm_cskd.evaluate`` output folder (``metrics.json`` and ``reliability.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from timm_cskd.invocation import program_name
from timm_cskd.reliability import load_bins, plot_reliability_overlay

__all__ = ["compare_table", "main"]

COLUMNS = [
    ("top1_err", "Top-1 err (%) ↓", "{:.2f}"),
    ("top5_err", "Top-5 err (%) ↓", "{:.2f}"),
    ("ece", "ECE (%) ↓", "{:.2f}"),
    ("nll", "NLL ↓", "{:.3f}"),
    ("brier", "Brier ↓", "{:.4f}"),
    ("recall_at_1", "R@1 (%) ↑", "{:.2f}"),
]


def compare_table(runs: dict[str, dict]) -> str:
    """Rows are runs, columns the paper's measurements; a run's relative top-1 change against the first."""
    lines = ["| Method | " + " | ".join(label for _, label, _ in COLUMNS) + " |"]
    lines.append("|---" * (len(COLUMNS) + 1) + "|")
    baseline = next(iter(runs.values())).get("top1_err")
    for i, (name, metrics) in enumerate(runs.items()):
        cells = []
        for key, _, fmt in COLUMNS:
            value = metrics.get(key)
            cell = fmt.format(value) if value is not None else "-"
            if key == "top1_err" and i > 0 and value is not None and baseline:
                cell += f" ({100 * (value - baseline) / baseline:+.1f}%)"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=program_name("python -m timm_cskd.compare"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", help="timm_cskd.evaluate output folders")
    parser.add_argument("--names", nargs="+", default=None, help="one label per run (default: folder names)")
    parser.add_argument("--output", default="reliability_compare.png", help="overlaid reliability diagram")
    args = parser.parse_args(argv)
    if args.names is not None and len(args.names) != len(args.runs):
        print(f"error: {len(args.names)} names for {len(args.runs)} runs", file=sys.stderr)
        return 2
    runs, bins = {}, {}
    for i, folder in enumerate(map(Path, args.runs)):
        name = (
            args.names[i]
            if args.names
            else (folder.parent.name if folder.name.startswith("eval") else folder.name)
        )
        metrics_file = folder / "metrics.json"
        if not metrics_file.is_file():
            print(
                f"error: {metrics_file} not found (run python -m timm_cskd.evaluate first)", file=sys.stderr
            )
            return 2
        try:
            runs[name] = json.loads(metrics_file.read_text(encoding="utf-8"))
            if not isinstance(runs[name], dict):
                raise ValueError(f"a {type(runs[name]).__name__}, not a mapping of metrics")
            numbers = [runs[name].get(key) for key, _, _ in COLUMNS]
            if not all(v is None or isinstance(v, int | float) for v in numbers):
                raise ValueError("its metrics are not numbers")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            print(
                f"error: {metrics_file} is not a readable timm_cskd.evaluate metrics.json ({e})",
                file=sys.stderr,
            )
            return 2
        reliability = folder / "reliability.json"
        if reliability.is_file():
            try:
                bins[name] = load_bins(reliability)
                if not isinstance(bins[name], dict) or not {"count", "conf_sum", "correct_sum"} <= set(
                    bins[name]
                ):
                    raise ValueError("expected the bins' count, conf_sum and correct_sum")
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
                print(f"error: {reliability} is not a readable reliability.json ({e})", file=sys.stderr)
                return 2
    print(compare_table(runs))
    if bins:
        plot_reliability_overlay(bins, args.output)
        print(f"\nreliability diagram: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
