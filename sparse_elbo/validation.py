"""Constructor checks shared by components: each error names the config key, the bad value and what is
allowed, and is a ``ConfigError`` (a user error, reported without a traceback)."""

from __future__ import annotations

from sparse_elbo.errors import ConfigError


def require_at_least(prefix: str, minimum: float, **values) -> None:
    """``prefix.key must be >= minimum`` for every ``key=value`` given."""
    for key, value in values.items():
        if not value >= minimum:
            raise ConfigError(f"{prefix}.{key} must be >= {minimum}, got {value}")


def require_positive(prefix: str, **values) -> None:
    """``prefix.key must be > 0`` for every ``key=value`` given."""
    for key, value in values.items():
        if not value > 0:
            raise ConfigError(f"{prefix}.{key} must be > 0, got {value}")


def require_one_of(key: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
