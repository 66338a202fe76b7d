"""User-facing errors: reported as one `error:` line on stderr with exit code 2, never a traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad file, bad config, stale artifacts). The message says how."""
