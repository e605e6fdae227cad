"""One exception type for problems the user can fix; the CLI prints it as a single line."""


class BenchError(Exception):
    """A user-facing error: the message names the file or option and what to do."""
