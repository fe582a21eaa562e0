"""sparse_elbo: probabilistic sparse coding learned with entropy-based ELBOs.

The path the command line takes, as functions::

    import sparse_elbo
    cfg = sparse_elbo.compose(["experiment=patches_em_small", "seed=1"])   # configs + overrides
    summary = sparse_elbo.run(cfg, "outputs/my_run")                       # train, write results.h5
    results = sparse_elbo.read_results(summary.results_path)               # every number back, as numpy

``resume(path)`` continues an interrupted run from its checkpoint; ``load(path)`` gives the trained model
(encode, reconstruct and score new data); ``score_dictionary(x, W)`` is ``max_q L_H`` of any dictionary on
data; ``denoise_image(noisy)`` denoises a grey image, ``inpaint_image(image, mask)`` fills its missing pixels; ``pretrained(name)`` is a dictionary shipped with the package
(``list_pretrained()`` names them), the same kind of model as ``load`` gives. None of them changes a setting of the process;
``retain_freed_memory()`` makes malloc keep freed memory for reuse, as the command line does
(``sparse_elbo/runner/memory.py``): a script that trains may call it first.
"""

from sparse_elbo.version import __version__

__all__ = [
    "compose",
    "denoise_image",
    "inpaint_image",
    "list_pretrained",
    "load",
    "pretrained",
    "read_results",
    "resume",
    "retain_freed_memory",
    "run",
    "score_dictionary",
    "__version__",
]


def __getattr__(name: str):
    # imported on first use, so that ``import sparse_elbo`` stays cheap and the layers below the API never
    # import it
    if name == "compose":
        from sparse_elbo.config import compose

        return compose
    if name in ("run", "resume"):
        from sparse_elbo import runner

        return getattr(runner, name)
    if name == "read_results":
        from sparse_elbo.results import read_results

        return read_results
    if name == "load":
        from sparse_elbo.trained import load

        return load
    if name == "inpaint_image":
        from sparse_elbo.inpaint import inpaint_image

        return inpaint_image
    if name in ("pretrained", "list_pretrained"):
        from sparse_elbo import bundles

        return getattr(bundles, name)
    if name == "score_dictionary":
        from sparse_elbo.inference.fit import score_dictionary

        return score_dictionary
    if name == "retain_freed_memory":
        from sparse_elbo.runner.memory import retain_freed_memory

        return retain_freed_memory
    if name == "denoise_image":
        from sparse_elbo.denoise import denoise_image

        return denoise_image
    raise AttributeError(f"module 'sparse_elbo' has no attribute {name!r}")
