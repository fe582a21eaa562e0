"""Side by side on the same natural-image patches: the authors' procedure, the fast EM with and without
annealing, and the fast EM without annealing started from the authors' final dictionary (the basin their
annealing finds, refined); plus any dictionaries made elsewhere (e.g. by the authors' own code on the
patches this script saves), scored the same way.

For every run and seed it prints the training time, ``max_q L_H`` at the learned W (``score_dictionary``:
one yardstick for every dictionary, whatever procedure made it), the median localisation index of the
fields, their median spread (the localisation index squared: the energy-weighted mean squared distance
from the field's centroid relative to a uniform field's) and the Gini coefficient of the posterior means.
A summary table (median over seeds) closes the output.

    python scripts/bench_annealing.py --n-patches 40960 --seeds 0 1
    python scripts/bench_annealing.py --runs authors --save-data outputs/x.npy --external theirs=W_0.npy
    python scripts/bench_annealing.py --runs em -- trainer.max_epochs=12     # overrides for every run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate

import sparse_elbo
from sparse_elbo.metrics import localisation_index

PRIOR = "experiment=patches_em_prior_annealing"  # a random start, the paper's prior annealing at a fixed scale
RUNS = {
    "authors": ["experiment=patches_em_authors"],
    "em": ["experiment=patches_em"],  # the experiment as shipped: MAP start, temperature annealing
    "em_map_none": ["experiment=patches_em", "annealing=none"],
    "em_prior": [PRIOR],
    "em_optimal": [PRIOR, "annealing.prior_scale=optimal"],  # the literal weighted objective while annealed
    "em_none": [PRIOR, "annealing=none"],
    # + the authors' final W of the seed
    "em_none_from_authors": [PRIOR, "annealing=none"],
}


def describe(W: np.ndarray, x: torch.Tensor, patch_size: int) -> dict:
    """The yardsticks of one dictionary W (D,H) on the patches x (N,D)."""
    start = time.perf_counter()
    score = sparse_elbo.score_dictionary(x, torch.as_tensor(W, dtype=x.dtype))
    localisation = localisation_index(W, (patch_size, patch_size))
    return {
        "score": score.elbo,
        "score_time": time.perf_counter() - start,
        "localisation": float(np.median(localisation)),
        "spread": float(np.median(localisation**2)),
    }


def train(name: str, overrides: list[str], out: Path) -> tuple[np.ndarray, dict]:
    cfg = sparse_elbo.compose(overrides)
    summary = sparse_elbo.run(cfg, out / name, overrides=overrides, progress=False)
    results = sparse_elbo.read_results(summary.results_path)
    return np.asarray(results.final["W"]), {
        "time": summary.train_time,
        "elbo": summary.elbo,
        "gini": float(results.metrics["gini_mean"][-1]),
        "lambda_off": int((np.asarray(results.final["lambda"]) < 0.05).sum()),
    }


def patches(n_patches: int, seed: int, extra: list[str]) -> tuple[torch.Tensor, int]:
    cfg = sparse_elbo.compose(["experiment=patches_em", f"dataset.n_patches={n_patches}", f"seed={seed}", *extra])
    dataset = instantiate(cfg.dataset)
    return torch.as_tensor(dataset.x, dtype=torch.float32), int(cfg.dataset.patch_size)


def print_row(name: str, seed: int, row: dict) -> None:
    trained = f"train {row['time']:7.1f} s  run ELBO {row['elbo']:8.3f}  Gini {row['gini']:.3f}  " if "time" in row else " " * 49
    print(
        f"{name:22s} seed {seed}  {trained}max_q L_H {row['score']:8.3f}  "
        f"localisation {row['localisation']:.3f}  spread {row['spread']:.3f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-patches", type=int, default=40960)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--runs", nargs="+", default=["authors", "em", "em_none", "em_none_from_authors"], choices=list(RUNS))
    parser.add_argument("--external", nargs="*", default=[], help="NAME=W_{seed}.npy: (D,H) dictionaries made elsewhere")
    parser.add_argument("--save-data", default=None, help="save each seed's patches as PATH with _{seed} before .npy")
    parser.add_argument("--out", default=None, help="keep the runs' results here (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_annealing_"))
    table: dict[str, list[dict]] = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.n_patches} patches; results in {out}")
    for seed in args.seeds:
        x, patch_size = patches(args.n_patches, seed, args.overrides)
        if args.save_data:
            np.save(Path(args.save_data).with_name(f"{Path(args.save_data).stem}_{seed}.npy"), x.numpy())
        common = [f"dataset.n_patches={args.n_patches}", f"seed={seed}", *args.overrides]
        for name in args.runs:
            overrides = RUNS[name] + common
            if name == "em_none_from_authors":
                overrides.append(f"model.init_dictionary={out / f'authors_{seed}_W.npy'}")
            W, row = train(f"{name}_{seed}", overrides, out)
            if name == "authors":
                np.save(out / f"authors_{seed}_W.npy", W)
            row.update(describe(W, x, patch_size))
            table.setdefault(name, []).append(row)
            print_row(name, seed, row)
        for item in args.external:
            name, path = item.split("=", 1)
            row = describe(np.load(path.replace("{seed}", str(seed))), x, patch_size)
            table.setdefault(name, []).append(row)
            print_row(name, seed, row)
    print("\nmedian over seeds            train s   max_q L_H   localisation   spread   Gini")
    for name, rows in table.items():
        median = {key: float(np.median([r[key] for r in rows])) for key in rows[0]}
        train_time = f"{median['time']:7.1f}" if "time" in median else "      -"
        gini = f"{median['gini']:.3f}" if "gini" in median else "  -"
        print(
            f"{name:26s} {train_time}   {median['score']:9.3f}   {median['localisation']:12.3f}   {median['spread']:6.3f}   {gini}"
        )


if __name__ == "__main__":
    sparse_elbo.retain_freed_memory()  # as the command line does (sparse_elbo/runner/memory.py)
    main()
