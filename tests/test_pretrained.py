"""The pretrained bundles shipped in the package: each loads as the trained-model object ``load`` gives, its
recorded command still composes to the data it describes, it scores new patches of that data as its recorded
ELBO says, it encodes and denoises by name, and (slow) re-training the small one by its command gives it back."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest
import torch

import sparse_elbo
from sparse_elbo.bundles import bundle_folder, bundle_info
from sparse_elbo.denoise import denoise_image, psnr
from sparse_elbo.encode import main as encode_main
from sparse_elbo.errors import ConfigError
from sparse_elbo.images import make_image_patches
from sparse_elbo.metrics import localisation_index
from sparse_elbo.trained import TrainedModel

NAMES = sorted(path.stem for path in bundle_folder().glob("*.json"))


def test_the_shipped_bundles_are_listed_with_their_descriptions():
    assert {"patches16_h100", "patches16_h100_small", "patches8_denoise"} <= set(NAMES)
    listed = sparse_elbo.list_pretrained()
    assert sorted(listed) == NAMES and all(len(text) > 20 for text in listed.values())
    with pytest.raises(ConfigError, match=r"^pretrained='lena': no such bundle; the shipped ones are \['patches"):
        sparse_elbo.pretrained("lena")


@pytest.mark.parametrize("name", NAMES)
def test_a_bundle_loads_with_its_provenance_and_its_command_still_makes_its_data(name):
    model = sparse_elbo.pretrained(name)
    info = bundle_info(name)
    assert isinstance(model, TrainedModel) and model.source == f"pretrained:{name}" and model.info == info
    p = info["preprocessing"]["patch_size"]
    assert model.n_observed == p * p and model.family == "diag"
    assert float(model.model.sigma2) == pytest.approx(info["sigma2"], rel=1e-6)
    made = info["made_by"]
    assert made["command"] == "python -m sparse_elbo.train " + " ".join(made["overrides"])
    assert re.fullmatch(r"[0-9a-f]{40}", made["commit"]) and made["date"] and made["machine"]
    dataset = sparse_elbo.compose(made["overrides"]).dataset  # the recorded command, composed today
    for key, value in info["preprocessing"].items():
        assert dataset.get(key) == value, key
    assert {"elbo", "elbo_run", "sigma2", "localisation_median"} <= set(info["scores"])


@pytest.mark.parametrize("name", NAMES)
def test_a_bundle_scores_new_patches_of_its_data_as_its_recorded_elbo_says(name):
    """An oracle for the arrays: W, σ², λ must together give held-out patches of the same photographs (other
    positions: another seed) the mean ELBO recorded for its training patches, within four standard errors of
    the sample mean and one nat; and fields as localised as recorded."""
    model, info = sparse_elbo.pretrained(name), bundle_info(name)
    settings = {key: value for key, value in info["preprocessing"].items() if key != "source"}
    settings["n_patches"] = 1000
    elbo = model.encode(make_image_patches(**settings, seed=12345).x).elbo  # (1000,)
    assert abs(np.mean(elbo) - info["scores"]["elbo"]) < 4 * np.std(elbo) / np.sqrt(len(elbo)) + 1.0
    p = info["preprocessing"]["patch_size"]
    median = np.median(localisation_index(model.model.W.detach().numpy(), (p, p)))
    assert median == pytest.approx(info["scores"]["localisation_median"], abs=1e-3)


def test_a_whitened_bundle_is_refused_for_denoising_and_a_raw_one_denoises_by_name():
    image = make_image_patches(patch_size=48, n_patches=1, whiten_images=False, seed=3, images=["camera"]).x.reshape(48, 48)
    noisy = image + np.random.default_rng(0).normal(0.0, 0.1, image.shape)
    with pytest.raises(ConfigError, match=r"pretrained:patches16_h100 was learned on whitened patches"):
        denoise_image(noisy, "patches16_h100")
    denoised = denoise_image(noisy, "patches8_denoise", refit_scales=True)
    assert psnr(image, denoised) > psnr(image, noisy) + 3.0
    with pytest.raises(ConfigError, match=r"^model must be a trained model .* or a bundle's name, got 3"):
        denoise_image(noisy, 3)


def test_the_encode_command_takes_a_bundle_by_name(tmp_path, capsys):
    patches = make_image_patches(patch_size=8, n_patches=20, whiten_images=False, remove_dc=True, seed=1).x
    np.save(tmp_path / "x.npy", patches)
    encode_main(["pretrained=patches8_denoise", f"data={tmp_path / 'x.npy'}", "dtype=float64"])
    out = tmp_path / "x.codes.h5"
    assert capsys.readouterr().out.strip() == str(out)
    expected = sparse_elbo.pretrained("patches8_denoise").encode(patches)
    with h5py.File(out, "r") as f:
        assert f.attrs["results"] == "pretrained:patches8_denoise"
        np.testing.assert_allclose(f["codes/mean"][()], expected.mean, atol=1e-8)
    for arguments in (
        [f"data={tmp_path / 'x.npy'}"],
        ["pretrained=patches8_denoise", "results=r.h5", f"data={tmp_path / 'x.npy'}"],
    ):
        with pytest.raises(ConfigError, match=r"^give the model as results=PATH .* or pretrained=NAME .*, one of the two$"):
            encode_main(arguments)


@pytest.mark.slow
def test_retraining_the_small_bundle_by_its_command_gives_it_back(tmp_path):
    """The bundle cannot silently rot: its recorded command, run by today's code, must learn the same
    dictionary (every field matched, up to sign and order) with the same ELBO, σ² and localisation."""
    info = bundle_info("patches16_h100_small")
    summary = sparse_elbo.run(sparse_elbo.compose(info["made_by"]["overrides"]), tmp_path / "run", progress=False)
    results = sparse_elbo.read_results(summary.results_path)
    shipped = sparse_elbo.pretrained("patches16_h100_small").model.W.detach().numpy()
    learned = np.asarray(results.final["W"], dtype=np.float64)
    similarity = np.abs(shipped.T @ learned) / np.outer(np.linalg.norm(shipped, axis=0), np.linalg.norm(learned, axis=0))
    assert np.median(similarity.max(1)) > 0.95 and np.quantile(similarity.max(1), 0.1) > 0.8
    scores = info["scores"]
    assert float(results.final["elbo"]) == pytest.approx(scores["elbo_run"], rel=2e-3)
    assert float(results.final["sigma2"]) == pytest.approx(scores["sigma2"], rel=0.02)
    assert np.median(results.final["localisation"]) == pytest.approx(scores["localisation_median"], abs=0.02)


def test_bundle_files_hold_only_what_the_json_describes():
    for name in NAMES:
        info = json.loads((bundle_folder() / f"{name}.json").read_text())
        with np.load(bundle_folder() / f"{name}.npz") as arrays:
            assert sorted(arrays.files) == ["W", "lambda", "sigma2"]
            D, H = arrays["W"].shape
            assert arrays["lambda"].shape == (H,) and D == info["preprocessing"]["patch_size"] ** 2
            assert torch.isfinite(torch.as_tensor(arrays["W"])).all()
