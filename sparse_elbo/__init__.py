"""sparse_elbo: probabilistic sparse coding learned with entropy-based ELBOs."""

__version__ = "0.1.0"
