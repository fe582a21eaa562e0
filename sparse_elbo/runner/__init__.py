"""Running an experiment from a composed config (docs/design.md §11): ``build`` checks the config and
makes the components, ``run`` trains and evaluates them into one results file, ``resume`` continues a run
from its checkpoint.

- ``build``: every config check, the memory estimate, instantiation with ``_target_``;
- ``record``: the per-epoch metric row, checked and written;
- ``checkpoint``: checkpoints and the signal guard;
- ``final``: the final evaluation and the run's summary;
- ``run``: the orchestration.
"""

from sparse_elbo.runner.build import Components, build
from sparse_elbo.runner.final import RunSummary
from sparse_elbo.runner.run import resume, run

__all__ = ["Components", "RunSummary", "build", "resume", "run"]
