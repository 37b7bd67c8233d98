"""The one error the build raises, and how custom_ops words any error in one line."""


class BuildError(RuntimeError):
    """The library cannot be built; the message says what is missing, `fix` how to get it."""

    def __init__(self, message: str, fix: str = ""):
        super().__init__(message)
        self.fix = fix


def first_line(error) -> str:
    """The first non-blank line of an error's message (or of a text); "" when there is none.
    custom_ops imports nothing of the project, so it keeps this twin of runtime.errors.first_line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else ""
