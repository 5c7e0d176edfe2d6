"""Errors a user can act on, and the one error they cannot.

LvrError and its kinds describe a problem with the user's input or environment: the CLI
prints their message as one 'Error: ...' line, the server answers 4xx with it.
InternalError is a broken contract inside lvr-local (a bug): the server answers 500 with
a request id and logs the traceback; the CLI writes the traceback to a log file and
prints one line naming it (lvr_local/cli/__init__.py).
"""


class LvrError(Exception):
    """A problem with the user's input or environment, stated so they can fix it."""


class ConfigError(LvrError):
    """models.toml (or a command-line override) is malformed."""


class ModelFileError(LvrError):
    """A model file is missing, unreadable, not a GGUF, or llama.cpp cannot load it."""


class UnsupportedTokenizerError(LvrError):
    """The GGUF's tokenizer cannot be turned into exact per-token bytes."""


class InternalError(Exception):
    """A broken internal contract: one part of lvr-local called another wrongly. Not an
    LvrError on purpose, so that no front end answers it as the user's mistake."""
