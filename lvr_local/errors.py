"""Errors a user can act on. The CLI prints their message, never a traceback."""


class LvrError(Exception):
    """A problem with the user's input or environment, stated so they can fix it."""


class ConfigError(LvrError):
    """models.toml (or a command-line override) is malformed."""


class ModelFileError(LvrError):
    """A model file is missing, unreadable, not a GGUF, or llama.cpp cannot load it."""


class UnsupportedTokenizerError(LvrError):
    """The GGUF's tokenizer cannot be turned into exact per-token bytes."""
