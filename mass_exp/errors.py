"""One exception type for bad user input, so entry points can print one line and exit non-zero."""


class ConfigError(RuntimeError):
    """Bad input from the user (a config key, a file, a task). The message says what to do."""
