"""The runtime's exceptions (one place, so folder.py, engine.py and callers share them)."""

from __future__ import annotations


class EngineError(RuntimeError):
    """The model folder cannot be used (missing files, wrong format, no custom-op library)."""


class VariantNotFoundError(KeyError):
    """The model folder has no file for the requested variant."""

    def __str__(self):  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


class PromptTooLongError(ValueError):
    """The prompt does not leave room for one new token in the context."""

    def __init__(self, prompt_tokens: int, context_length: int, detail: str = ""):
        self.prompt_tokens, self.context_length = prompt_tokens, context_length
        super().__init__(
            f"prompt is {prompt_tokens} tokens but the context holds {context_length} "
            f"(at most {context_length - 1} prompt tokens leave room for one new token){detail}")


def first_line(error) -> str:
    """The first non-blank line of an exception's message (its type name when it has none), or
    of a text: what a one-line error shows of a long one (onnxruntime's, a compiler's)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines:
        return lines[0]
    return type(error).__name__ if isinstance(error, BaseException) else ""


def error_line(error: BaseException, limit: int = 300) -> str:
    """`Type: first line` of an exception (its type alone when it has no message), the line cut
    at `limit` characters: how a one-line error names a foreign failure (the hub's, an export's)."""
    name, line = type(error).__name__, first_line(str(error))
    return f"{name}: {line[:limit]}" if line else name
