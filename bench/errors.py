"""One exception type for problems the user can fix; the CLI prints it as a single line."""

from __future__ import annotations

WORKER_TRACEBACK = "Original Traceback (most recent call last):"


class BenchError(Exception):
    """A user-facing error: the message names the file or option and what to do."""


def _strip_module(line: str) -> str:
    """``bench.errors.BenchError: msg`` as ``BenchError: msg``: the module says nothing new."""
    name, colon, message = line.partition(":")
    if colon and name.replace(".", "").replace("_", "").isalnum():
        return f"{name.rpartition('.')[2]}{colon}{message}"
    return line


def one_line(error_text: str) -> str:
    """The line of a failure that says what went wrong.

    That is the first line, except for an error re-raised from a DataLoader worker: torch
    puts "Caught X in DataLoader worker process N." first and the worker's traceback
    after it, so the real message (the unreadable file, say) is the last exception line
    of that traceback.
    """
    lines = error_text.strip().splitlines()
    if not lines:
        return ""
    if WORKER_TRACEBACK not in lines:
        return lines[0]
    worker = lines[len(lines) - 1 - lines[::-1].index(WORKER_TRACEBACK) :]
    # Frames are indented; an exception line is the first unindented line after them.
    raised = [
        line
        for before, line in zip(worker, worker[1:], strict=False)
        if before.startswith(" ") and line and not line.startswith(" ")
    ]
    return _strip_module(raised[-1]) if raised else lines[0]


def failure_text(error_text: str, debug: bool) -> str:
    """A failed cell as printed: one line, or with ``--debug`` all that was stored for it
    (the traceback too), since a bug is found from where it was raised."""
    return error_text.rstrip() if debug else one_line(error_text)
