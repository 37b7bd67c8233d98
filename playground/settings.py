"""The page's settings as one object: system prompt, baseline and the sampling settings.

`PageSettings` is what the settings panel shows and what a turn records (a shared link
restores them from its last turn); `ChatSettings` is its sampling part, which the turn loop
turns into the runtime's GenerationSettings.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, fields, replace

DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_MAX_NEW = 256


class ChatSettings:
    """The page's sampling settings; seed < 0 (the default) = a fresh random seed per turn."""

    def __init__(self, max_new_tokens=DEFAULT_MAX_NEW, temperature=0.6, top_p=0.9, top_k=0,
                 repetition_penalty=1.0, seed=-1, frequency_penalty=0.0, presence_penalty=0.0):
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.top_k, self.repetition_penalty, self.seed = top_k, repetition_penalty, seed
        self.frequency_penalty, self.presence_penalty = frequency_penalty, presence_penalty

    def turn_seed(self) -> int:
        """The seed of one turn (both engines share it: the same tokens where their logits agree)."""
        if self.seed is None or int(self.seed) < 0:
            return secrets.randbelow(2**31)
        return int(self.seed)

    def to_runtime(self, seed: int, max_time_s: float | None = None):
        from runtime import GenerationSettings

        return GenerationSettings(
            max_new_tokens=max(1, int(self.max_new_tokens)), temperature=max(0.0, float(self.temperature)),
            top_k=max(0, int(self.top_k)), top_p=min(1.0, max(1e-3, float(self.top_p))),
            repetition_penalty=max(1e-3, float(self.repetition_penalty)),
            frequency_penalty=min(2.0, max(-2.0, float(self.frequency_penalty))),
            presence_penalty=min(2.0, max(-2.0, float(self.presence_penalty))),
            seed=int(seed), truncate=True, max_time_s=max_time_s)


@dataclass
class PageSettings:
    """Everything the settings panel and the baseline menu hold, as one value."""

    system: str = DEFAULT_SYSTEM
    baseline: str = "int2"
    max_new_tokens: int = DEFAULT_MAX_NEW
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = -1
    frequency_penalty: float = 0.0  # OpenAI's, in [-2, 2]
    presence_penalty: float = 0.0

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_values(cls, values: dict) -> "PageSettings":
        """From {field name: value} (the page's inputs, a link); a missing or unreadable value
        keeps the default."""
        default, out = cls(), {}
        for name in cls.names():
            fallback, value = getattr(default, name), values.get(name)
            try:
                out[name] = fallback if value is None else type(fallback)(value)
            except (TypeError, ValueError):
                out[name] = fallback
        return cls(**out)

    def chat(self) -> ChatSettings:
        return ChatSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                            top_p=self.top_p, top_k=self.top_k,
                            repetition_penalty=self.repetition_penalty, seed=self.seed,
                            frequency_penalty=self.frequency_penalty,
                            presence_penalty=self.presence_penalty)

    def as_dict(self) -> dict:
        return asdict(self)

    def restored_from(self, turn: dict | None) -> "PageSettings":
        """These settings overridden by the ones a turn ran with (a shared link, a reload,
        a switched conversation), its baseline included."""
        if not turn:
            return self
        used = {k: v for k, v in (turn.get("settings") or {}).items()
                if k in self.names() and v is not None}
        if turn.get("baseline"):
            used["baseline"] = turn["baseline"]
        return replace(self, **used)
