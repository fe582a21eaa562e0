"""The report tools (``python -m sparse_elbo.report.<tool>``) in-process: what a user can get wrong (a missing
extra, folder or file, a file that is not a results file) is one line and exit status 2, and a bug is
never turned into such a line or into silence."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from sparse_elbo.cli import report_user_errors
from sparse_elbo.report import figures, plot_run, summarize, sweeps

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


@pytest.mark.slow
def test_python_m_figures_without_matplotlib_is_one_line_and_status_2(sweep):
    """The command as a user runs it, in a process where matplotlib cannot be imported: nothing the module
    imports needs it, and the error is the one line (the only subprocess of these tests)."""
    hide = (
        "import runpy, sys; sys.modules['matplotlib'] = None; runpy.run_module('sparse_elbo.report.figures', run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    out = subprocess.run(
        [sys.executable, "-c", hide, str(sweep)], cwd=sweep, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"error: the figures need matplotlib, which is not installed: {INSTALL}\n"


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


# ------------------------------------------------------------------------------------- folders and files


def _tool(tool, *arguments):
    return lambda: report_user_errors(lambda: tool.main([str(a) for a in arguments]))


def _junk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("notes, not an HDF5 file")
    return path


@pytest.mark.parametrize("tool", [summarize, figures], ids=["summarize", "figures"])
def test_a_folder_that_does_not_exist_or_holds_no_results_files_is_one_line(tool, tmp_path, one_line_error):
    line = one_line_error(_tool(tool, tmp_path / "nowhere"))
    assert line == f"error: {str(tmp_path / 'nowhere')!r}: no such folder or results file"
    (tmp_path / "empty" / "job").mkdir(parents=True)
    (tmp_path / "empty" / "job" / "notes.txt").write_text("no results here")
    line = one_line_error(_tool(tool, tmp_path / "empty"))
    assert line == f"error: {str(tmp_path / 'empty')!r}: no results files (results.h5) in this folder or below it"
    assert sorted(p.name for p in (tmp_path / "empty").rglob("*")) == ["job", "notes.txt"]  # no empty tables or figures


@pytest.mark.parametrize("tool", [summarize, figures, plot_run], ids=["summarize", "figures", "plot_run"])
def test_an_output_folder_that_does_not_exist_is_one_line_naming_out_before_any_work(tool, sweep, tmp_path, one_line_error):
    target = sweep / "run" / "results.h5" if tool is plot_run else sweep
    nowhere = tmp_path / "nowhere" / "x"
    line = one_line_error(_tool(tool, target, "--out", nowhere))
    assert line == f"error: --out {str(nowhere)!r}: no such folder; create it first or choose another --out"
    assert not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in sweep.rglob("*")) == ["results.h5", "run"]  # nothing written beside the runs either
    (tmp_path / "a_file").write_text("")
    line = one_line_error(_tool(tool, target, "--out", tmp_path / "a_file"))
    assert line.startswith(f"error: --out {str(tmp_path / 'a_file')!r}: not a folder")


@pytest.mark.parametrize("tool", [summarize, figures, plot_run], ids=["summarize", "figures", "plot_run"])
def test_a_results_file_named_by_the_user_that_is_not_one_is_one_line(tool, tmp_path, one_line_error):
    junk = _junk(tmp_path / "run" / "results.h5")
    assert one_line_error(_tool(tool, junk)) == f"error: {str(junk)!r}: not a results file (not HDF5)"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["results.h5", "run"]


def test_figures_of_a_folder_whose_results_files_cannot_be_read_is_one_line(tmp_path, one_line_error):
    _junk(tmp_path / "sweep" / "0" / "results.h5")
    line = one_line_error(_tool(figures, tmp_path / "sweep"))
    assert line.startswith(f"error: {str(tmp_path / 'sweep')!r}: none of its 1 results files could be read (0/results.h5: ")
    assert line.endswith("not a results file (not HDF5)); no figures")


def test_plot_run_of_a_run_without_a_final_dictionary_is_one_line(sweep, one_line_error):
    path = sweep / "run" / "results.h5"
    with h5py.File(path, "a") as f:
        f.attrs["status"], f.attrs["reason"] = "failed", "FloatingPointError: non-finite values at epoch 0"
        del f["final"]["W"]
    line = one_line_error(_tool(plot_run, path))
    assert line == (
        f"error: {str(path)!r}: no final W to draw: the run is failed (FloatingPointError: non-finite values at epoch 0); "
        "plot_run draws a finished run"
    )


# ----------------------------------------------------------------------------- unreadable files and bugs


def test_a_foreign_file_in_a_sweep_is_listed_as_unreadable_but_a_bug_is_not_swallowed(sweep, monkeypatch):
    _junk(sweep / "junk" / "results.h5")
    runs = {run.path.parent.name: run for run in sweeps.load_runs(sweep)}
    assert runs["run"].status == "finished"
    assert runs["junk"].status == "unreadable" and runs["junk"].reason.endswith("not a results file (not HDF5)")

    def broken(path):
        raise ZeroDivisionError("a bug in the reader")

    monkeypatch.setattr(sweeps, "read_results", broken)
    with pytest.raises(ZeroDivisionError, match="a bug in the reader"):
        sweeps.load_run(sweep / "run" / "results.h5")
    with pytest.raises(ZeroDivisionError):  # the tool too: a traceback, not a one-line user error
        report_user_errors(lambda: summarize.main([str(sweep)]))


def test_the_bars_data_row_is_left_out_for_another_versions_config_but_a_bug_is_not_swallowed(monkeypatch):
    import sparse_elbo.data
    from sparse_elbo.results import read_results

    results = read_results(OLD_RUN)
    assert figures.bars_examples(results, 6).shape == (6, 9)  # 3x3 bars, regenerated from the stored config
    for changed in ({"_target_": "sparse_elbo.data.make_bars_of_another_version"}, {"bar_width": 2}):
        old = copy.deepcopy(results)
        old.config["dataset"].update(changed)
        assert figures.bars_examples(old, 6) is None

    def broken(**settings):
        raise ZeroDivisionError("a bug in the data builder")

    monkeypatch.setattr(sparse_elbo.data, "make_bars", broken)
    with pytest.raises(ZeroDivisionError, match="a bug in the data builder"):
        figures.bars_examples(results, 6)
