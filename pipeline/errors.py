"""User-facing errors: reported as one `error:` line on stderr with exit code 2, never a traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad file, bad config, stale artifacts). The message says how."""


def require_int(value, key: str, minimum: int) -> int:
    """`value` as a whole number >= minimum, or one `error:` line naming `key`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{key}={value}: must be a whole number >= {minimum}")
    return value


def require_number(value, key: str, low: float, high: float | None = None) -> float:
    """`value` as a number in [low, high) (or >= low), or one `error:` line naming `key`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or \
            (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise UserError(f"{key}={value}: must be a number {bound}")
    return float(value)
