"""The report tools (``python -m sparse_elbo.report.<tool>``) in-process: what a user can get wrong (a missing
extra, folder or file, a file that is not a results file) is one line and exit status 2, and a bug is
never turned into such a line or into silence."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from sparse_elbo.cli import report_user_errors
from sparse_elbo.report import figures, plot_run, summarize

INSTALL = 'pip install "sparse_elbo[figures]"'
OLD_RUN = Path(__file__).parent / "data" / "results_v0.1.h5"  # a finished 3x3 bars run (test_design.py)


@pytest.fixture
def sweep(tmp_path):
    """A folder holding one finished run's results file, ``sweep/run/results.h5``."""
    (tmp_path / "sweep" / "run").mkdir(parents=True)
    shutil.copy(OLD_RUN, tmp_path / "sweep" / "run" / "results.h5")
    return tmp_path / "sweep"


def _without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed: import raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)


@pytest.mark.parametrize("tool", [figures, plot_run], ids=["figures", "plot_run"])
def test_the_figure_tools_without_matplotlib_say_how_to_install_it(tool, sweep, monkeypatch, one_line_error):
    _without_matplotlib(monkeypatch)
    line = one_line_error(lambda: report_user_errors(lambda: tool.main([str(sweep / "run" / "results.h5")])))
    assert line == f"error: the figures need matplotlib, which is not installed: {INSTALL}"
    assert not list(sweep.rglob("*.png"))


def test_summaries_need_no_matplotlib(sweep, monkeypatch, capsys):
    _without_matplotlib(monkeypatch)
    report_user_errors(lambda: summarize.main([str(sweep)]))
    assert "| 1 | 0 |" in (sweep / "summary.md").read_text()  # one configuration, one finished run, none failed
    assert "1 results files, 1 finished" in capsys.readouterr().out


def test_plot_run_draws_one_run_beside_its_file(sweep, capsys):
    report_user_errors(lambda: plot_run.main([str(sweep / "run" / "results.h5")]))
    for name in ("dictionary", "curves"):
        assert (sweep / "run" / f"{name}.png").stat().st_size > 1000
    assert capsys.readouterr().out.split() == [str(sweep / "run" / "dictionary.png"), str(sweep / "run" / "curves.png")]
