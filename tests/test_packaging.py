"""The package as users get it: a wheel built from this checkout, installed in a fresh virtual environment,
runs the default, an experiment and the tools from a directory outside the checkout (its configs come from
inside the wheel)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a wheel built and installed in a fresh environment


def _run(args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh virtual environment holding the wheel; its dependencies come from this environment's
    site-packages (a path line, so that nothing else of this environment — the checkout's own editable
    install — is seen)."""
    root = tmp_path_factory.mktemp("wheel")
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", REPO], cwd=root)
    assert built.returncode == 0, built.stderr
    (wheel,) = (root / "dist").glob("sparse_elbo-*.whl")
    environment = root / "env"
    venv.EnvBuilder(with_pip=True).create(environment)
    python = environment / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = _run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], cwd=root)
    assert install.returncode == 0, install.stderr
    work = root / "elsewhere"
    work.mkdir()
    return environment, work


def test_the_wheel_ships_the_configs_and_imports_from_the_environment(installed):
    environment, work = installed
    out = _run(
        [
            environment / "bin" / "python",
            "-c",
            "import sparse_elbo, sparse_elbo.config as c; print(sparse_elbo.__file__); print(c.config_dir()); "
            "print(','.join(sparse_elbo.list_pretrained())); print(sparse_elbo.pretrained('patches8_denoise').source)",
        ],
        work,
    )
    assert out.returncode == 0, out.stderr
    package, configs, bundles, source = out.stdout.split()
    assert set(bundles.split(",")) == {path.stem for path in (REPO / "sparse_elbo" / "bundled").glob("*.json")}
    assert source == "pretrained:patches8_denoise"
    assert package.startswith(str(environment)) and configs.startswith(str(environment))
    assert (Path(configs) / "train.yaml").is_file() and (Path(configs) / "experiment" / "patches_em.yaml").is_file()


def test_the_installed_default_and_an_experiment_run_from_outside_the_checkout(installed):
    environment, work = installed
    default = _run([environment / "bin" / "python", "-m", "sparse_elbo.train", f"hydra.run.dir={work}/default"], work)
    assert default.returncode == 0, default.stderr
    assert "all fields recovered" in default.stdout and (work / "default" / "results.h5").is_file()
    experiment = _run(
        [
            environment / "bin" / "sparse-elbo",
            "experiment=patches_em_small",
            "trainer.max_epochs=1",
            "trainer.average_last_epochs=1",
            "dataset.n_patches=1000",
            "device=cpu",
            f"hydra.run.dir={work}/patches",
        ],
        work,
    )
    assert experiment.returncode == 0, experiment.stderr
    assert "final ELBO" in experiment.stdout
    for tool, args in (("report.summarize", [work]), ("report.plot_run", [work / "patches" / "results.h5"])):
        out = _run([environment / "bin" / "python", "-m", f"sparse_elbo.{tool}", *args], work)
        assert out.returncode == 0, (tool, out.stderr)
    assert (work / "summary.md").is_file() and (work / "patches" / "dictionary.png").stat().st_size > 1000
    error = _run([environment / "bin" / "sparse-elbo", "dataset.noise=-1"], work)
    assert error.returncode == 2 and error.stderr.strip() == "error: dataset.noise must be > 0, got -1"
