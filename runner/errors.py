"""The errors a user can fix. The CLI prints their one-line message and exits with code 2."""


class UserError(Exception):
    """Bad input or a condition the user can fix."""


class ConfigError(UserError, ValueError):
    """A bad experiment file, override or value; the message is one line naming file and key."""


class RunLocked(UserError):
    """Another process is training this run right now (its lock on a disk, its lease in a bucket)."""
