"""Summarise a sweep: read every results file under DIR, group the runs by their stored config (the
seed aside) and write ``summary.csv`` (one row per configuration: the swept keys, counts, mean / std /
count of each quantity), ``runs.csv`` (one row per run) and ``summary.md`` (a Markdown table, printed
too, with the runs that did not finish listed under it with their reason).

    python -m sparse_elbo.report.summarize outputs/paper/bars_recovery [--out DIR]

Quantities (those the runs have): final ELBO, ELBO − ground-truth ELBO and recovery rate (bars), σ,
final Gini, median localisation (patches), held-out log p(x) and amortisation gap (held-out data),
epochs and training time. Statistics are over finished runs; failed, interrupted, unfinished (still
running or killed) and unreadable files are counted and listed separately, never dropped silently. A DIR
that does not exist or holds no results file, one file that is not a results file, and an --out folder
that does not exist are one-line errors (exit status 2), found before anything is written.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from sparse_elbo.cli import output_folder, report_user_errors
from sparse_elbo.report.sweeps import (
    QUANTITIES,
    group_runs,
    load_sweep,
    markdown_table,
    not_finished,
    relative,
    run_quantities,
    summary_rows,
    sweep_path,
)


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})


def summarize(root: Path, out: Path | None = None, quiet: bool = False) -> str:
    """Tables of the runs under ``root`` (a sweep directory, or one results file) written to ``out``
    (default: ``root``, or the file's folder). A folder without results files, or a single file that is not
    one, is a user error (``sweeps.load_sweep``)."""
    runs = load_sweep(root)
    folder = root.parent if root.is_file() else root  # paths in the tables are relative to it
    out = out or folder
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    columns, rows = summary_rows(groups)
    write_csv(out / "summary.csv", columns, rows)

    run_columns = ["path", "status", *(groups[0].label if groups else []), *QUANTITIES, "reason"]
    run_rows = []
    group_of = {id(r): g for g in groups for r in g.runs}
    for r in runs:
        row = {"path": relative(r.path, folder), "status": r.status, "reason": r.reason}
        if id(r) in group_of:
            row.update(group_of[id(r)].label)
            if r.finished:
                row.update(run_quantities(r.results))
        run_rows.append(row)
    write_csv(out / "runs.csv", run_columns, run_rows)

    n_finished = sum(r.finished for r in runs)
    lines = [
        f"# Sweep summary: {root}",
        "",
        f"{len(runs)} results files, {n_finished} finished, {len(runs) - n_finished} not finished; "
        f"{len(groups)} configurations (grouped by stored config, seed aside). Mean ± standard deviation over finished runs.",
        "",
        markdown_table(groups) if groups else "(no readable results files)",
    ]
    failed = not_finished(runs)
    if failed:
        lines += ["", "## Runs that did not finish", "", "| run | status | configuration | reason |", "|---|---|---|---|"]
        for r in failed:
            name = group_of[id(r)].name if id(r) in group_of else ""
            reason = (r.reason or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {relative(r.path, folder)} | {r.status} | {name} | {reason} |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    if not quiet:
        print(text)
        print(f"wrote {out / 'summary.csv'}, {out / 'runs.csv'}, {out / 'summary.md'}", file=sys.stderr)
    return text


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="a sweep directory (searched recursively for results.h5), or one results file")
    parser.add_argument("--out", type=Path, default=None, help="an existing folder for the tables (default: the sweep directory)")
    args = parser.parse_args(arguments)
    root = sweep_path(args.sweep)
    summarize(root, output_folder(args.out, "--out") if args.out is not None else None)


if __name__ == "__main__":
    report_user_errors(main)
