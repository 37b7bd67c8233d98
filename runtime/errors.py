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
