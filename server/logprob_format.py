"""Log-probabilities (runtime.logprobs.TokenLogprob) in OpenAI's two shapes.

- chat completions: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": None}`
- completions (legacy): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, where an
  echoed prompt's first token has no context and so `None` for its logprob and its top.

A token's text is what it decodes to alone; its `bytes` are the exact bytes it stands for
(a byte-level BPE piece may hold part of a UTF-8 character, which alone decodes to U+FFFD).
"""

from __future__ import annotations

import functools


CONTEXT = 8  # tokens of context for a token's text (spacing, characters split across tokens)


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

    @functools.lru_cache(maxsize=65536)
    def special(self, token: int) -> bool:
        """A special token (BOS, end of turn, ...): shown in `tokens`, absent from the text."""
        return not self.tokenizer.decode([int(token)], skip_special_tokens=True) and bool(self.text(token))

    def after(self, window: list[int], token: int) -> str:
        """The text `token` adds after the tokens of `window` (decoders that join tokens with
        spaces put one between words, which the token alone would not show)."""
        if not window:
            return self.text(token)
        before = self.tokenizer.decode(window, skip_special_tokens=False)
        after = self.tokenizer.decode(window + [int(token)], skip_special_tokens=False)
        return after[len(before):] if after.startswith(before) else self.text(token)

    def walk(self, ids, context=()):
        """(token, window before it) for each token of `ids` after `context`."""
        window = [int(t) for t in context][-CONTEXT:]
        for token in ids:
            yield int(token), window
            window = (window + [int(token)])[-CONTEXT:]

    def bytes(self, token: int) -> list[int]:
        piece = self.tokenizer.id_to_token(int(token))
        if self.byte_level and piece is not None:
            table = _byte_decoder()
            if all(c in table for c in piece):
                return [table[c] for c in piece]
        return list(self.text(token).encode("utf-8"))

    def __hash__(self):
        return id(self)


def chat_logprobs(names: TokenText, logprobs, context=()) -> dict:
    """OpenAI's chat `logprobs` object for the generated tokens' TokenLogprobs (`context`: the
    tokens generated before them, for their text)."""
    def entry(window, token: int, logprob: float) -> dict:
        return {"token": names.after(window, token), "logprob": logprob, "bytes": names.bytes(token)}

    content = []
    for lp, (token, window) in zip(logprobs, names.walk([lp.token for lp in logprobs], context)):
        content.append(dict(entry(window, token, lp.logprob), top_logprobs=[entry(window, t, v) for t, v in lp.top]))
    return {"content": content, "refusal": None}


def _top_dict(names: TokenText, window, top) -> dict:
    out: dict[str, float] = {}
    for token, value in top:  # most likely first: a text two tokens share keeps the larger
        out.setdefault(names.after(window, token), value)
    return out


def completion_logprobs(names: TokenText, prompt_ids, prompt_scores, generated, offset: int = 0,
                        context=()) -> dict:
    """OpenAI's completions `logprobs`: the echoed prompt (`prompt_ids` with `prompt_scores`,
    one per token after the first; both None without echo) then the generated tokens'
    TokenLogprobs (`context`: tokens generated before them). `text_offset` counts characters of
    the returned text from `offset` (special tokens, which the text leaves out, take none)."""
    scored = []  # (token, window before it, its TokenLogprob or None)
    if prompt_ids is not None:
        scored += [(token, window, prompt_scores[i - 1] if i > 0 else None)
                   for i, (token, window) in enumerate(names.walk(prompt_ids))]
    scored += [(token, window, lp)
               for lp, (token, window) in zip(generated, names.walk([lp.token for lp in generated], context))]
    tokens, token_logprobs, tops, offsets = [], [], [], []
    position = offset
    for token, window, score in scored:
        tokens.append(names.after(window, token))
        token_logprobs.append(None if score is None else score.logprob)
        tops.append(None if score is None else _top_dict(names, window, score.top))
        offsets.append(position)
        position += 0 if names.special(token) else len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
