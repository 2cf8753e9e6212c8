"""One error type for every bad input a user can give us.

CLIs catch `ConfigError` and print its message as a single line, so messages must name
the bad value and what would have been accepted.
"""
from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A user-facing, one-line error about bad input (config value, path, file): exit code 2."""


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN/Inf; the last finite checkpoint is left as it was: exit code 3."""


def bad_value(what: str, value: object, accepted: Iterable[object] | str) -> ConfigError:
    if not isinstance(accepted, str):
        accepted = ", ".join(str(a) for a in accepted)
    return ConfigError(f"{what}={value!r} is not valid; accepted: {accepted}")
