"""Command-line error reporting: a user error prints one line ``error: …`` and exits with status 2; a bug
keeps its traceback. ``HYDRA_FULL_ERROR=1`` shows every traceback, user errors included."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from sparse_elbo.errors import ConfigError, ExistingFileError, MissingFileError, UserError

USER_ERROR_STATUS = 2


def one_line(text: str) -> str:
    """Hydra's and OmegaConf's messages on one line: the lines after one ending in ``:`` become a list,
    OmegaConf's ``full_key:``/``object_type=`` detail lines are dropped."""
    text = str(text).split("\nConfig search path")[0]  # Hydra's list of search paths: not for the user
    parts = [p.strip() for p in text.splitlines()]
    parts = [p for p in parts if p and not p.startswith(("full_key:", "object_type=", "reference_type="))]
    out: list[str] = []
    listing = False  # after a line ending in ':', one-word lines are the items of a list
    for part in parts:
        if listing and len(part.split()) == 1:
            out[-1] += (" " if out[-1].endswith(":") else ", ") + part
            continue
        listing = part.endswith(":")
        out.append(part)
    return ". ".join(p.rstrip(".") for p in out)


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of a user error (a bad override, a missing key or value, a ``UserError``
    anywhere in the cause chain); None for anything else, which is a bug."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue

    chain, seen = [], error
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for item in chain:
        if isinstance(item, UserError):
            return one_line(str(item))
    for item in chain:
        if isinstance(item, (MissingMandatoryValue, ConfigKeyError, OverrideParseException)):
            return one_line(str(item))
        if isinstance(item, (ConfigCompositionException, MissingConfigException)):
            cause = item.__cause__
            detail = f" ({one_line(str(cause))})" if cause is not None and str(cause) not in str(item) else ""
            return one_line(str(item)) + detail
    return None


_SHOW_TRACEBACKS = {"value": os.environ.get("HYDRA_FULL_ERROR") == "1"}  # as the user set it, before report_user_errors


def exit_on_user_error(error: BaseException) -> None:
    """Print a user error as one line and exit with status 2 (unless the user asked for tracebacks); return
    for anything else, which the caller re-raises."""
    message = None if _SHOW_TRACEBACKS["value"] else user_error_message(error)
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)


def report_user_errors(main: Callable[[], object]) -> None:
    """Run a command-line ``main`` (a Hydra entry point or an argparse tool): user errors become one line on
    stderr and exit status 2 (module docstring). Errors inside a single run's task are reported there
    (``exit_on_user_error``), before Hydra prints its own line about the failed job."""
    before = os.environ.get("HYDRA_FULL_ERROR")
    _SHOW_TRACEBACKS["value"] = before == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing, so the error can be classified
    try:
        main()
    except Exception as error:
        exit_on_user_error(error)
        raise
    finally:  # as the user set it: a tool called in-process leaves the environment as it was
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before


def settings_from_arguments(schema: type, arguments: list[str]):
    """``key=value`` arguments of a tool checked against the dataclass ``schema``: an unknown key, a value of
    the wrong type or a missing required one is a user error naming the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    bad = [argument for argument in arguments if "=" not in argument]
    if bad:
        raise ConfigError(f"arguments are key=value pairs, got {bad[0]!r}")
    try:
        settings = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(arguments))
        missing = sorted(OmegaConf.missing_keys(settings))
        if missing:
            raise ConfigError(f"{missing[0]} is required: add {missing[0]}=...")
        return OmegaConf.to_object(settings)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        raise ConfigError(f"{key}: {one_line(str(error))}" if key else one_line(str(error))) from error


def run_tool(main: Callable[[list[str]], object], arguments: list[str] | None = None) -> None:
    """Run a ``key=value`` tool; ``-h``/``--help`` prints its module's docstring (its settings), user errors
    become one line on stderr and exit status 2."""
    arguments = sys.argv[1:] if arguments is None else arguments
    if any(argument in ("-h", "--help") for argument in arguments):
        print(sys.modules[main.__module__].__doc__)
        return
    _SHOW_TRACEBACKS["value"] = os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        main(arguments)
    except Exception as error:
        exit_on_user_error(error)
        raise


def output_folder(path: str | Path, option: str = "--out") -> Path:
    """The folder a tool's ``option`` names for its output: it must exist, checked before any work, so that a
    mistyped path is neither created nor found out after the work is done."""
    folder = Path(path)
    if not folder.exists():
        raise MissingFileError(f"{option} {str(folder)!r}: no such folder; create it first or choose another {option}")
    if not folder.is_dir():
        raise ConfigError(f"{option} {str(folder)!r}: not a folder; {option} names the folder to write into")
    return folder


def output_file(path: str | Path, key: str = "out", suffixes: tuple[str, ...] | None = None) -> Path:
    """The file a ``key=value`` tool's ``key`` names for its output: of one of ``suffixes`` (when given), new
    (never overwritten) and in a folder that exists; checked before any work."""
    file = Path(path)
    named = f"{key}={str(file)!r}"
    if suffixes is not None and file.suffix.lower() not in suffixes:
        raise ConfigError(f"{named}: unsupported file type {file.suffix!r}; allowed: {list(suffixes)}")
    if file.exists():
        raise ExistingFileError(f"{named} already exists: choose another {key}=")
    if not file.parent.is_dir():
        raise MissingFileError(f"{named}: no such folder {str(file.parent)!r}; create it first or choose another {key}=")
    return file
