"""The chat-completions request, from bytes to GenerationSettings, validated in one place.

    req = await read_chat_request(request, limits)   # ChatRequest, or ApiError naming the field
    settings = req.settings(engine, limits)          # GenerationSettings, or ApiError 400

The body is read with its size limit (413) and read timeout (408), decoded as JSON whatever
its content type (curl -d sends form encoding), and validated by the pydantic models below
(the shape FastAPI apps give their requests): they say the types and ranges, and the limits
from the server's configuration (how many messages, stop strings) through the validation
context. `to_api_error` is the one translation of a validation error into OpenAI's error
shape (missing_field / invalid_type / invalid_value / unsupported*, `param` the field's path
such as `messages[0].content`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .errors import ApiError, bad
from .limits import Limits

MIN_TEMPERATURE = 1e-4  # below this a temperature means greedy decoding
ROLE_MAP = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

Int = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Bool = Annotated[bool, Field(strict=True)]


def _type_name(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(v), type(v).__name__)


OUR_CODES = ("invalid_type", "invalid_value", "unsupported", "unsupported_role", "unsupported_content",
             "too_many_messages")


def _limits(info: ValidationInfo) -> Limits:
    """The server's limits a request is validated against (passed as the validation context)."""
    return (info.context or {}).get("limits") or Limits()


def _fail(code: str, message: str, param: str | None = None):
    """A validation error with our code; `param` for errors raised on the whole body."""
    return PydanticCustomError(code, message, {"param": param} if param else None)


class KnownFields(BaseModel):
    """A part of a request whose unknown keys are refused by name (a key set to null or
    empty is as good as absent: clients that send a previous answer's message back carry
    `"refusal": null` and the like)."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_keys(cls, value):
        if isinstance(value, dict):
            for name, v in value.items():
                if name not in cls.model_fields and v not in (None, [], {}, ""):
                    raise _fail("unsupported", f"unrecognized field {str(name)[:60]!r} (docs/SERVING.md lists "
                                               "the fields this server takes)")
        return value


class Message(KnownFields):

    role: Any = None
    content: Any = None
    tool_calls: Any = None

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, role):
        if not isinstance(role, str) or role not in ROLE_MAP:
            raise _fail("unsupported_role" if isinstance(role, str) else "invalid_type",
                        f"must be one of system, developer, user, assistant; got {str(role)[:40]!r}")
        return ROLE_MAP[role]

    @field_validator("tool_calls", mode="before")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise _fail("unsupported", "tool calls are not supported")
        return None

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, content):
        """A string or an array of {"type": "text", "text"} parts (null only for assistant
        turns: checked in the model validator, which knows the role)."""
        if content is None or isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise _fail("invalid_type", f"must be a string or an array of text parts, got {_type_name(content)}")
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise _fail("invalid_type", f"[{j}] must be an object like {{\"type\": \"text\", "
                                            f"\"text\": ...}}, got {_type_name(part)}")
            if part.get("type") != "text":
                raise _fail("unsupported_content", f"[{j}]: only text parts are supported (type "
                                                   f"'text'), got type {str(part.get('type'))[:40]!r}")
            if not isinstance(part.get("text"), str):
                raise _fail("invalid_type", f"[{j}].text must be a string")
            parts.append(part["text"])
        return "".join(parts)

    @model_validator(mode="after")
    def _null_content(self):
        if self.content is None:
            if self.role != "assistant":
                raise _fail("invalid_type", "content must be a string or an array of text parts, got null")
            self.content = ""
        return self


class StreamOptions(KnownFields):
    include_usage: Bool = False


class ResponseFormat(KnownFields):
    type: Literal["text"]


# Fields the API recognises but refuses (400 "unsupported" naming the field).
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "logit_bias",
               "audio", "modalities", "prediction", "web_search_options", "reasoning_effort", "suffix")
MAX_TOP_LOGPROBS = 20
TokenIds = list[Annotated[int, Field(strict=True, ge=0)]]


class SamplingRequest(BaseModel):
    """The fields chat and text completions share. Every field acts or is refused: unknown
    fields are a 400 (as OpenAI answers "Unrecognized request argument"), the recognised but
    unsupported ones (UNSUPPORTED) too; `user` is kept in the request's record."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(strict=True, min_length=1)]
    stream: Optional[Bool] = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[Annotated[Number, Field(ge=0.0, le=2.0)]] = None
    top_p: Optional[Annotated[Number, Field(ge=0.0, le=1.0)]] = None
    top_k: Optional[Annotated[int, Field(strict=True, ge=0)]] = None
    repetition_penalty: Optional[Annotated[Number, Field(gt=0.0, le=10.0)]] = None
    frequency_penalty: Optional[Annotated[Number, Field(ge=-2.0, le=2.0)]] = None
    presence_penalty: Optional[Annotated[Number, Field(ge=-2.0, le=2.0)]] = None
    n: Optional[Annotated[int, Field(strict=True, ge=1)]] = None
    seed: Optional[Int] = None
    stop: Any = None  # a string or an array of strings: see _stop
    user: Optional[Annotated[str, Field(strict=True, max_length=256)]] = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, stop):
        if stop is None:
            return None
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _fail("invalid_type", "must be a string or an array of strings")
        return stop

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, body):
        if not isinstance(body, dict):
            raise _fail("invalid_type", f"the request body must be a JSON object, got {_type_name(body)}")
        for name in UNSUPPORTED:
            if body.get(name) not in (None, False, [], {}, "none", ""):
                raise _fail("unsupported", f"{name} is not supported by this server", name)
        for name in body:
            if name not in cls.model_fields and name not in UNSUPPORTED:
                raise _fail("unsupported", f"unrecognized request argument {str(name)[:60]!r} (docs/SERVING.md "
                                           "lists the fields this server takes)", str(name)[:60])
        return body

    @model_validator(mode="after")
    def _within_limits(self, info: ValidationInfo):
        """The server's own limits (the validation context's Limits), and the seed as numpy takes it."""
        limits = _limits(info)
        stop = self.stop or []
        if len(stop) > limits.max_stop:
            raise _fail("invalid_value", f"at most {limits.max_stop} stop strings, got {len(stop)}", "stop")
        if any(len(s) > limits.max_stop_chars for s in stop):
            raise _fail("invalid_value", f"a stop string may have at most {limits.max_stop_chars} characters",
                        "stop")
        if self.seed is not None:
            self.seed %= 1 << 64  # any integer, as OpenAI accepts; numpy wants it non-negative
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    @property
    def choices(self) -> int:
        return self.n or 1

    def check_n(self, engine) -> None:
        """n > 1 shares the prompt's prefill through the batcher: refused on a plain engine and
        beyond the batcher's slots (all n decode side by side)."""
        if self.choices == 1:
            return
        batcher = engine.batcher
        if batcher is None:
            raise bad("n > 1 needs the continuous batcher (python -m server --batch SLOTS); this model "
                      "serves one sequence at a time", "n", "unsupported")
        if self.choices > batcher.pool.slots:
            raise bad(f"n must be at most {batcher.pool.slots} (the batcher's slots: the n choices decode "
                      f"together), got {self.choices}", "n")

    def sampling(self, engine, limits: Limits, prompt_len: int, wanted: int | None, logprobs: int | None):
        """GenerationSettings: `wanted` new tokens (None: the server's default) clamped to the
        server's cap and to the context left after `prompt_len` tokens."""
        from runtime import GenerationSettings

        self.check_n(engine)
        context = int(engine.context_length)
        cap = min(limits.max_tokens_cap or context, context)
        wanted = wanted if wanted is not None else limits.default_max_tokens
        temperature = limits.default_temperature if self.temperature is None else self.temperature
        # A temperature this small is greedy decoding in all but name; 0 says so exactly.
        if temperature < MIN_TEMPERATURE:
            temperature = 0.0
        return GenerationSettings(max_new_tokens=max(1, min(wanted, cap, context - prompt_len)),
                                  temperature=float(temperature), top_k=self.top_k or 0,
                                  top_p=max(float(self.top_p if self.top_p is not None else 1.0), 1e-9),
                                  repetition_penalty=float(self.repetition_penalty or 1.0),
                                  frequency_penalty=float(self.frequency_penalty or 0.0),
                                  presence_penalty=float(self.presence_penalty or 0.0),
                                  seed=self.seed, stop=self.stop_list, logprobs=logprobs)


class ChatRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Optional[Annotated[int, Field(strict=True, ge=1)]] = None
    max_completion_tokens: Optional[Annotated[int, Field(strict=True, ge=1)]] = None
    logprobs: Optional[Bool] = None
    top_logprobs: Optional[Annotated[int, Field(strict=True, ge=0, le=MAX_TOP_LOGPROBS)]] = None
    response_format: Optional[ResponseFormat] = None

    @model_validator(mode="after")
    def _chat_limits(self, info: ValidationInfo):
        limits = _limits(info)
        if len(self.messages) > limits.max_messages:
            raise _fail("too_many_messages", f"too many messages: {len(self.messages)} (the limit is "
                                             f"{limits.max_messages})", "messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise _fail("invalid_value", "top_logprobs needs logprobs: true", "top_logprobs")
        return self

    @property
    def wanted_tokens(self) -> int | None:
        given = [v for v in (self.max_tokens, self.max_completion_tokens) if v is not None]
        return min(given) if given else None

    @property
    def chat(self) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in self.messages]

    @property
    def top(self) -> int | None:
        """settings.logprobs: None (off) or how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompt(self, engine) -> list[int]:
        """The prompt's token ids with the chat template (ApiError 400 when it does not fit)."""
        from runtime import PromptTooLongError

        try:
            return engine.prompt_ids(messages=self.chat)
        except PromptTooLongError as e:
            # the API's own remedy (an HTTP client has no settings.truncate)
            raise ApiError(400, f"the messages are too long: they are {e.prompt_tokens} tokens with the "
                                f"chat template, and this model's context holds {e.context_length} "
                                "tokens for prompt and answer together; send fewer or shorter messages "
                                "(drop the oldest turns)", param="messages",
                           code="context_length_exceeded") from None
        except ValueError as e:
            raise bad(f"the messages cannot be used: {e}", "messages") from None

    def settings(self, engine, limits: Limits, prompt: list[int] | None = None):
        """GenerationSettings for this request on `engine`: max_tokens clamped to the context
        left after the prompt (`prompt`: its ids when already made; ApiError 400 when the prompt
        alone does not fit)."""
        prompt = self.prompt(engine) if prompt is None else prompt
        return self.sampling(engine, limits, len(prompt), self.wanted_tokens, self.top)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: a text or token-id prompt (or an array of them)."""

    prompt: Any  # see _prompt
    max_tokens: Optional[Annotated[int, Field(strict=True, ge=0)]] = None  # 0: score the prompt only
    echo: Optional[Bool] = False
    logprobs: Optional[Annotated[int, Field(strict=True, ge=0, le=MAX_TOP_LOGPROBS)]] = None
    best_of: Optional[Annotated[int, Field(strict=True, ge=1)]] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, prompt):
        """A string, an array of strings, an array of token ids, or an array of such arrays:
        always a list of prompts, each a str or a list of ints."""
        def ids(value) -> bool:
            return isinstance(value, list) and bool(value) and all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)

        if isinstance(prompt, str):
            return [prompt]
        if ids(prompt):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids(p) for p in prompt):
            return prompt
        raise _fail("invalid_type", "must be a string, an array of strings, a non-empty array of token ids "
                                    "(integers >= 0) or an array of such arrays")

    @model_validator(mode="after")
    def _completion_limits(self, info: ValidationInfo):
        limits = _limits(info)
        if len(self.prompt) > limits.max_prompts:
            raise _fail("invalid_value", f"at most {limits.max_prompts} prompts per request, got "
                                         f"{len(self.prompt)}", "prompt")
        if self.best_of is not None and self.best_of != self.choices:
            raise _fail("unsupported", "best_of must equal n (the server returns every choice it "
                                       "generates; it does not rank them)", "best_of")
        if self.max_tokens == 0 and self.stream:
            raise _fail("invalid_value", "max_tokens 0 (scoring the prompt) does not stream; send "
                                         "stream: false", "max_tokens")
        return self

    def prompts(self, engine) -> list[list[int]]:
        """Each prompt's token ids: text through the tokenizer (BOS added as the model's
        tokenizer adds it), ids as they are (checked against the vocabulary)."""
        from runtime import PromptTooLongError

        out = []
        for i, prompt in enumerate(self.prompt):
            where = "prompt" if len(self.prompt) == 1 else f"prompt[{i}]"
            try:
                if isinstance(prompt, str):
                    ids = engine.prompt_ids(prompt=prompt)
                else:
                    ids = list(prompt)
                    if max(ids) >= engine.vocab_size:
                        raise ValueError(f"token ids must be below the vocabulary size {engine.vocab_size}")
                    if len(ids) >= engine.context_length and not (self.max_tokens == 0 and
                                                                  len(ids) == engine.context_length):
                        raise PromptTooLongError(len(ids), engine.context_length)
            except PromptTooLongError as e:
                raise ApiError(400, f"{where} is {e.prompt_tokens} tokens; this model's context holds "
                                    f"{e.context_length} tokens for prompt and completion together",
                               param=where, code="context_length_exceeded") from None
            except ValueError as e:
                raise bad(f"{where} cannot be used: {e}", where) from None
            out.append(ids)
        return out

    def settings(self, engine, limits: Limits, prompts: list[list[int]]):
        """GenerationSettings (max_tokens: OpenAI's default 16 when not given) for the longest prompt."""
        wanted = 16 if self.max_tokens is None else self.max_tokens
        settings = self.sampling(engine, limits, max(len(p) for p in prompts), max(wanted, 1), self.logprobs)
        if wanted == 0:
            settings.max_new_tokens = 0  # scoring only: nothing is generated
        return settings


# pydantic's error types -> our codes (custom errors carry their code as their type)
_CODES = {"missing": "missing_field", "literal_error": "unsupported", "finite_number": "invalid_value",
          "too_short": "invalid_value", "too_long": "invalid_value"}
_RANGE = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _param(loc) -> str | None:
    """A validation error's location as the client wrote the path: messages[0].content."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or None


def to_api_error(err: ValidationError) -> ApiError:
    """The first validation error as OpenAI's error shape: 400, code, param, a message that
    names the field."""
    e = err.errors(include_url=False)[0]
    kind, loc = e["type"], e["loc"]
    param = _param(loc) or (e.get("ctx") or {}).get("param")
    if kind in OUR_CODES:  # raised by our validators: the message is written for the client
        code, msg = kind, e["msg"]
        where = _param(loc)
        message = msg if not where else f"{where}{msg}" if msg.startswith("[") else f"{where}: {msg}"
    elif kind == "too_short" and param == "messages":
        code, message = "invalid_value", "messages must not be empty"
    elif kind in _RANGE:
        code = "invalid_value"
        message = f"{param} must be {e['msg'].removeprefix('Input should be ')}, got {e.get('input')!r}"
    elif kind.endswith("_type") or kind.endswith("_parsing") or kind in ("int_from_float",):
        code = "invalid_type"
        want = {"int": "an integer", "float": "a number", "bool": "a boolean", "string": "a string",
                "list": "an array", "model": "an object", "dict": "an object"}
        what = next((v for k, v in want.items() if kind.startswith(k)), "another type")
        message = f"{param} must be {what}, got {_type_name(e.get('input'))}"
    elif kind in _CODES:
        code = _CODES[kind]
        if kind == "missing":
            message = f"{param} is required" + (
                " and must be a non-empty string (see GET /v1/models)" if param == "model" else
                ": an array of {\"role\", \"content\"} objects" if param == "messages" else "")
        elif kind == "literal_error" and param and param.startswith("response_format"):
            message, param = "response_format: only {\"type\": \"text\"} is supported", "response_format"
        elif kind == "finite_number":
            message = f"{param} must be finite"
        else:
            message = f"{param} {e['msg'].lower()}"
    else:  # any other pydantic error: its own words, named by the field
        code, message = "invalid_value", f"{param}: {e['msg']}"
    if param == "model" and code == "invalid_value":
        message = "model is required and must be a non-empty string (see GET /v1/models)"
    return bad(message, param, code)


def parse_completion_request(body, limits: Limits) -> CompletionRequest:
    return CompletionRequest.model_validate(body, context={"limits": limits})


async def read_completion_request(request, limits: Limits) -> CompletionRequest:
    return parse_completion_request(parse_json(await read_body(request, limits)), limits)


def parse_chat_request(body, limits: Limits) -> ChatRequest:
    """A decoded JSON body as a ChatRequest; pydantic's ValidationError (see to_api_error)
    for the first problem."""
    return ChatRequest.model_validate(body, context={"limits": limits})


async def read_chat_request(request, limits: Limits) -> ChatRequest:
    """The request's body, read within the limits, as a validated ChatRequest."""
    return parse_chat_request(parse_json(await read_body(request, limits)), limits)


async def read_body(request, limits: Limits) -> bytes:
    """The body: 413 beyond limits.max_body_bytes (declared or counted), 408 when it takes
    longer than limits.body_timeout_s to arrive."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limits.max_body_bytes:
                raise ApiError(413, f"the request body is {int(declared)} bytes; the limit is "
                                    f"{limits.max_body_bytes}", code="body_too_large")
        except ValueError:
            raise bad("Content-Length is not a number", code="invalid_header") from None
    chunks, size = [], 0

    async def read():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ApiError(413, f"the request body exceeds the limit of {limits.max_body_bytes} bytes",
                               code="body_too_large")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {limits.body_timeout_s} s",
                       code="body_timeout") from None
    return b"".join(chunks)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes):
    if not body.strip():
        raise bad("the request body is empty; send a JSON object", code="invalid_json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"the request body is not UTF-8 text ({e.reason} at byte {e.start})", code="invalid_json") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise bad("the JSON is nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
