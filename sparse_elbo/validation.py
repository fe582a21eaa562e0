"""Argument checks shared by components. Each error names the argument as the caller wrote it, the bad value
and what is allowed, and is a ``ConfigError`` (a user error, reported without a traceback) whose ``key`` is
that argument: the runner, which knows where in the config a component's arguments live, names the full
config path (``ConfigError.under``), so ``EMTrainer(max_epochs=0)`` says ``max_epochs must be >= 1`` and the
command line ``trainer.max_epochs=0`` says ``trainer.max_epochs must be >= 1``."""

from __future__ import annotations

from sparse_elbo.errors import ConfigError


def invalid(key: str, message: str) -> ConfigError:
    """``key message`` (``key=value ...`` when the message starts with ``=``) as a ``ConfigError`` that names
    ``key``."""
    separator = "" if message.startswith(("=", ":")) else " "
    return ConfigError(f"{key}{separator}{message}", key=key)


def require_at_least(minimum: float, **values) -> None:
    """``key must be >= minimum`` for every ``key=value`` given (None is not checked)."""
    for key, value in values.items():
        if value is not None and not value >= minimum:
            raise invalid(key, f"must be >= {minimum}, got {value}")


def require_positive(**values) -> None:
    """``key must be > 0`` for every ``key=value`` given."""
    for key, value in values.items():
        if not value > 0:
            raise invalid(key, f"must be > 0, got {value}")


def require_one_of(key: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise invalid(key, f"must be one of {list(allowed)}, got {value!r}")
