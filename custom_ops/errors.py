"""The one error the build raises."""


class BuildError(RuntimeError):
    """The library cannot be built; the message says what is missing, `fix` how to get it."""

    def __init__(self, message: str, fix: str = ""):
        super().__init__(message)
        self.fix = fix
