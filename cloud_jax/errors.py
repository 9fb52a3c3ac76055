"""Exception types shared across modules (kept import-free to avoid cycles)."""


class ConfigError(ValueError):
    """A config file, override or value that does not fit the schema; the message names the key."""
