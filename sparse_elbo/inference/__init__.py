"""Inference at a fixed dictionary: fitting the posteriors ``q_n`` for given ``W`` (docs/design.md §6).

Used by the trainers (the E-step of EM, the profile objective), by evaluation (the ground-truth ELBO,
refining held-out posteriors) and by anything that encodes new data with a learned dictionary.

- ``statistics``: data blocks and the sufficient statistics from which ``σ²*``, ``λ*`` and the closed-form
  dictionary follow;
- ``kernels``: the fused value-and-gradient of the diagonal-Laplace E-step (the hot path of EM);
- ``e_step``: E-step objectives (strategies chosen with ``_target_``) and the block E-step driver (L-BFGS);
- ``fixed_point``: the batched fixed-point (natural-gradient) fit of every ``q_n`` at once;
- ``diagonal_newton``: the O(N·H²) fit of diagonal ``q_n`` under the Laplace prior (``score_dictionary``).
"""
