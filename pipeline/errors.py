"""The one exception type that the entry point turns into a single `error:` line."""


class PipelineError(Exception):
    """Bad input or config: the message says what is wrong and how to fix it, on one line."""
