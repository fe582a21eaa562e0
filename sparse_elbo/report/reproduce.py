"""The report of ``scripts/reproduce.sh``: for each paper sweep that was run, the figure, the command, the
headline numbers per configuration (from its results files) and the measured times; then each sweep's
summary table. Called by reproduce.sh; can be rerun on existing sweeps:

    python -m sparse_elbo.report.reproduce quick outputs/paper/reproduce_quick.md TOTAL_S JOBS THREADS NAME|SWEEP_S|POST_S ...
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

from sparse_elbo.report.sweeps import QUANTITIES, group_runs, load_runs, statistics

FIGURES = {
    "bars_recovery": (
        "bars recovery: diag vs full posterior (recovery, bars_fields)",
        ("recovered", "elbo_minus_ground_truth", "sigma"),
    ),
    "objectives": ("ELBO against time: sampled K=1/10, analytic, entropy (elbo, entropies)", ("elbo", "recovered", "train_time")),
    "patches_annealing": (
        "natural-image fields: prior annealing at λ*, at a fixed λ, none (annealing, dictionary_k, gini)",
        ("elbo", "gini", "localisation_median"),
    ),
    "amortized_vs_not": ("amortised vs per-data-point posteriors (elbo, recovery)", ("elbo", "held_out_log_px", "recovered")),
}
SHORT = {
    "recovered": "recovered",
    "elbo_minus_ground_truth": "ELBO−GT",
    "sigma": "σ",
    "elbo": "ELBO",
    "train_time": "time",
    "gini": "Gini",
    "localisation_median": "loc.",
    "held_out_log_px": "held-out log p(x)",
}


def headline(directory: Path, quantities) -> str:
    groups = group_runs(load_runs(directory))
    parts = []
    for g in groups:
        stats = statistics(g)
        values = []
        for q in quantities:
            if q not in stats:
                continue
            s = stats[q]
            if QUANTITIES[q][1] == "rate":
                values.append(f"{SHORT[q]} {round(s.mean * s.count)}/{s.count}")
            elif q == "train_time":
                values.append(f"{SHORT[q]} {s.mean:.1f} s")
            else:
                values.append(f"{SHORT[q]} {s.mean:.3f}" if abs(s.mean) < 100 else f"{SHORT[q]} {s.mean:.1f}")
        failed = f", {len(g.failed)} failed" if g.failed else ""
        parts.append(f"**{g.name}**: {', '.join(values)}{failed}")
    return "<br>".join(parts) or "(no results)"


def main() -> None:
    if len(sys.argv) < 6:
        print(
            "usage: python -m sparse_elbo.report.reproduce MODE REPORT TOTAL_S JOBS THREADS [NAME|SWEEP_S|POST_S ...] (called by scripts/reproduce.sh)",
            file=sys.stderr,
        )
        sys.exit(2)
    mode, report, total, jobs, threads, *times = sys.argv[1:]
    suffix = "_quick" if mode == "quick" else ""
    lines = [
        f"## reproduce.sh {mode}",
        "",
        f"Total {int(total)} s ({int(total) / 60:.1f} min) on {platform.machine()} with {jobs} parallel jobs x {threads} torch threads "
        f"(torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'CPU'}). Headlines: mean over seeds per configuration.",
        "",
        "| figure | command | headline (measured) | sweep time | summary + figures |",
        "|---|---|---|---|---|",
    ]
    summaries = []
    for entry in times:
        name, sweep_s, post_s = entry.split("|")
        base = name[: -len(suffix)] if suffix and name.endswith(suffix) else name
        figure, quantities = FIGURES.get(base, (base, ("elbo",)))
        directory = Path("outputs/paper") / name
        lines.append(
            f"| {figure} | `python -m sparse_elbo.train paper={name}` | {headline(directory, quantities)} | {sweep_s} s | {post_s} s |"
        )
        if (directory / "summary.md").is_file():
            summaries += ["", (directory / "summary.md").read_text().replace("# Sweep summary", "### Sweep summary")]
    Path(report).write_text("\n".join(lines + summaries) + "\n")


if __name__ == "__main__":
    main()
