"""Log-probabilities (runtime.logprobs.TokenLogprob) in OpenAI's two shapes.

- chat completions: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": None}`
- completions (legacy): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, where an
  echoed prompt's first token has no context and so `None` for its logprob and its top.

A token's text is what it decodes to alone; its `bytes` are the exact bytes it stands for
(a byte-level BPE piece may hold part of a UTF-8 character, which alone decodes to U+FFFD).
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenText:
    """Text and bytes of token ids under one tokenizer (a tokenizers.Tokenizer)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = tokenizer.decoder
        self.byte_level = decoder is not None and "ByteLevel" in repr(decoder)

    @functools.lru_cache(maxsize=65536)
    def text(self, token: int) -> str:
        text = self.tokenizer.decode([int(token)], skip_special_tokens=False)
        return text if text else (self.tokenizer.id_to_token(int(token)) or "")

    def bytes(self, token: int) -> list[int]:
        piece = self.tokenizer.id_to_token(int(token))
        if self.byte_level and piece is not None:
            table = _byte_decoder()
            if all(c in table for c in piece):
                return [table[c] for c in piece]
        return list(self.text(token).encode("utf-8"))

    def __hash__(self):
        return id(self)


def chat_logprobs(names: TokenText, logprobs) -> dict:
    """OpenAI's chat `logprobs` object for the generated tokens' TokenLogprobs."""
    def entry(token: int, logprob: float) -> dict:
        return {"token": names.text(token), "logprob": logprob, "bytes": names.bytes(token)}

    return {"content": [dict(entry(lp.token, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top])
                        for lp in logprobs], "refusal": None}


def _top_dict(names: TokenText, top) -> dict:
    out: dict[str, float] = {}
    for token, value in top:  # most likely first: a text two tokens share keeps the larger
        out.setdefault(names.text(token), value)
    return out


def completion_logprobs(names: TokenText, prompt_ids, prompt_scores, generated, offset: int = 0) -> dict:
    """OpenAI's completions `logprobs`: the echoed prompt (`prompt_ids` with `prompt_scores`,
    one per token after the first; both None without echo) then the generated tokens'
    TokenLogprobs. `text_offset` counts characters of the returned text from `offset`."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    position = offset
    if prompt_ids is not None:
        for i, token in enumerate(prompt_ids):
            score = prompt_scores[i - 1] if i > 0 else None
            tokens.append(names.text(token))
            token_logprobs.append(None if score is None else score.logprob)
            tops.append(None if score is None else _top_dict(names, score.top))
            offsets.append(position)
            position += len(tokens[-1])
    for lp in generated:
        tokens.append(names.text(lp.token))
        token_logprobs.append(lp.logprob)
        tops.append(_top_dict(names, lp.top))
        offsets.append(position)
        position += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
