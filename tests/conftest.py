"""Shared test setup: every test starts from seeded global RNGs (tests also pass explicit generators)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_global_rngs():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny matrices are fastest single-threaded (and immune to a busy second core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_line_error(capsys, monkeypatch):
    """Run a command-line tool in-process (``lambda: run_tool(main, arguments)`` or ``lambda:
    report_user_errors(lambda: main(arguments))``): it must exit with status 2 and print exactly one line
    ``error: …`` on stderr, which is returned."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)  # the user's setting would show tracebacks

    def run(call) -> str:
        capsys.readouterr()  # what earlier steps of the test printed
        with pytest.raises(SystemExit) as exit_info:
            call()
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert exit_info.value.code == 2, err
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        return lines[0]

    return run
