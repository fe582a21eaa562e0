"""Command-line entry point: ``python -m sparse_elbo.train [overrides]`` (Hydra).

Only assembles: composes the config, hands it to ``sparse_elbo.runner.run``, prints the summary and
returns the final ELBO (so that a Hydra sweeper such as Optuna can maximise it).
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sparse_elbo.runner import run


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    summary = run(cfg, hydra_cfg.runtime.output_dir, overrides=list(hydra_cfg.overrides.task))
    print("\n".join(summary.lines()))
    return summary.elbo


if __name__ == "__main__":
    main()
