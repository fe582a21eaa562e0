"""Constructor checks shared by components: each error names the config key, the bad value and
what is allowed."""

from __future__ import annotations


def require_at_least(prefix: str, minimum: float, **values) -> None:
    """``prefix.key must be >= minimum`` for every ``key=value`` given."""
    for key, value in values.items():
        if not value >= minimum:
            raise ValueError(f"{prefix}.{key} must be >= {minimum}, got {value}")


def require_one_of(key: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")
