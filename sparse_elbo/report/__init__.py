"""Reading runs back and reporting them, apart from the library that trains them: the reporting imports the
library, never the other way round (tests/test_design.py).

- ``sweeps``: every ``results.h5`` under a directory, grouped by its stored config (the seed aside);
- ``summarize``: ``python -m sparse_elbo.report.summarize DIR`` writes a sweep's tables;
- ``figures``: ``python -m sparse_elbo.report.figures DIR`` redraws the paper's figures;
- ``plot_run``: ``python -m sparse_elbo.report.plot_run FILE`` draws one run;
- ``reproduce``: the report of ``scripts/reproduce.sh``.

``figures`` and ``plot_run`` need matplotlib: ``pip install "sparse_elbo[figures]"``.
"""
