"""The one error the build raises, how custom_ops words any error in one line, and its log line."""

import sys


class BuildError(RuntimeError):
    """The library cannot be built; the message says what is missing, `fix` how to get it."""

    def __init__(self, message: str, fix: str = ""):
        super().__init__(message)
        self.fix = fix


def first_line(error) -> str:
    """The first non-blank line of an exception's message (its type name when it has none), or
    of a text. custom_ops imports nothing of the project (it builds and loads on its own), so it
    keeps this twin of runtime.errors.first_line; the two behave the same."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines:
        return lines[0]
    return type(error).__name__ if isinstance(error, BaseException) else ""


def log(message: str) -> None:
    """A progress line of the build or the header search, on stderr (stdout stays the answer)."""
    print(f"[custom_ops] {message}", file=sys.stderr, flush=True)
