"""Command-line entry point: ``python -m sparse_elbo.train [overrides]`` (also ``sparse-elbo``; Hydra).

Only assembles: composes the config, hands it to ``sparse_elbo.runner.run``, prints the summary and
returns the final ELBO (so that a Hydra sweeper such as Optuna can maximise it). User errors print one
line and exit with status 2 (``sparse_elbo.cli``).
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sparse_elbo.cli import exit_on_user_error, report_user_errors
from sparse_elbo.config import config_dir
from sparse_elbo.runner import run


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    try:
        summary = run(cfg, hydra_cfg.runtime.output_dir, overrides=list(hydra_cfg.overrides.task))
    except Exception as error:
        if hydra_cfg.mode == RunMode.RUN:  # in a sweep the other jobs go on; Hydra reports the failed ones
            exit_on_user_error(error)
        raise
    print("\n".join(summary.lines()))
    return summary.elbo


def main() -> None:
    report_user_errors(hydra_main)


if __name__ == "__main__":
    main()
