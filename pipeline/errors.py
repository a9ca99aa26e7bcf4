"""The one error type users see: a one-line message, a non-zero exit, no traceback."""


class PipelineError(Exception):
    """Bad input or an artifact that cannot be used. The CLI prints `error: <message>` and exits 2."""
