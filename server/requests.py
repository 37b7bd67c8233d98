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
UNSUPPORTED = ("tools", "tool_choice", "logprobs", "top_logprobs", "logit_bias")

Int = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Bool = Annotated[bool, Field(strict=True)]


def _type_name(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(v), type(v).__name__)


OUR_CODES = ("invalid_type", "invalid_value", "unsupported", "unsupported_role", "unsupported_content",
             "too_many_messages")


def _fail(code: str, message: str, param: str | None = None):
    """A validation error with our code; `param` for errors raised on the whole body."""
    return PydanticCustomError(code, message, {"param": param} if param else None)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: Bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]


class ChatRequest(BaseModel):
    """POST /v1/chat/completions. Unknown fields are accepted and ignored (OpenAI clients send
    bookkeeping fields such as `user` and `metadata`)."""

    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(strict=True, min_length=1)]
    messages: Annotated[list[Message], Field(min_length=1)]
    stream: Optional[Bool] = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[Annotated[int, Field(strict=True, ge=1)]] = None
    max_completion_tokens: Optional[Annotated[int, Field(strict=True, ge=1)]] = None
    temperature: Optional[Annotated[Number, Field(ge=0.0, le=2.0)]] = None
    top_p: Optional[Annotated[Number, Field(ge=0.0, le=1.0)]] = None
    top_k: Optional[Annotated[int, Field(strict=True, ge=0)]] = None
    repetition_penalty: Optional[Annotated[Number, Field(gt=0.0, le=10.0)]] = None
    frequency_penalty: Optional[Annotated[Number, Field(ge=-2.0, le=2.0)]] = None  # accepted, ignored
    presence_penalty: Optional[Annotated[Number, Field(ge=-2.0, le=2.0)]] = None  # accepted, ignored
    n: Optional[Annotated[int, Field(strict=True, ge=1)]] = None
    seed: Optional[Int] = None
    stop: Any = None  # a string or an array of strings: see _stop
    response_format: Optional[ResponseFormat] = None

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

    @model_validator(mode="after")
    def _within_limits(self, info: ValidationInfo):
        """The server's own limits (the validation context's Limits), and the seed as numpy takes it."""
        limits: Limits = (info.context or {}).get("limits") or Limits()
        if len(self.messages) > limits.max_messages:
            raise _fail("too_many_messages", f"too many messages: {len(self.messages)} (the limit is "
                                             f"{limits.max_messages})", "messages")
        stop = self.stop or []
        if len(stop) > limits.max_stop:
            raise _fail("invalid_value", f"at most {limits.max_stop} stop strings, got {len(stop)}", "stop")
        if any(len(s) > limits.max_stop_chars for s in stop):
            raise _fail("invalid_value", f"a stop string may have at most {limits.max_stop_chars} characters",
                        "stop")
        if self.seed is not None:
            self.seed %= 1 << 64  # any integer, as OpenAI accepts; numpy wants it non-negative
        return self

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, body):
        if not isinstance(body, dict):
            raise _fail("invalid_type", f"the request body must be a JSON object, got {_type_name(body)}")
        for name in UNSUPPORTED:
            if body.get(name) not in (None, False, [], {}, "none"):
                raise _fail("unsupported", f"{name} is not supported by this server", name)
        if body.get("n") not in (None, 1) and isinstance(body.get("n"), int) and not isinstance(body.get("n"), bool) \
                and body["n"] >= 1:
            raise _fail("unsupported", "n must be 1 (one choice per request)", "n")
        return body

    # what the engine gets
    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def wanted_tokens(self) -> int | None:
        given = [v for v in (self.max_tokens, self.max_completion_tokens) if v is not None]
        return min(given) if given else None

    @property
    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    @property
    def chat(self) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


    def settings(self, engine, limits: Limits):
        """GenerationSettings for this request on `engine`: max_tokens clamped to the context
        left after the prompt (ApiError 400 when the prompt alone does not fit)."""
        from runtime import GenerationSettings, PromptTooLongError

        try:
            prompt = engine.prompt_ids(messages=self.chat)
        except PromptTooLongError as e:
            # the API's own remedy (an HTTP client has no settings.truncate)
            raise ApiError(400, f"the messages are too long: they are {e.prompt_tokens} tokens with the "
                                f"chat template, and this model's context holds {e.context_length} "
                                "tokens for prompt and answer together; send fewer or shorter messages "
                                "(drop the oldest turns)", param="messages",
                           code="context_length_exceeded") from None
        except ValueError as e:
            raise bad(f"the messages cannot be used: {e}", "messages") from None
        context = int(engine.context_length)
        cap = min(limits.max_tokens_cap or context, context)
        wanted = self.wanted_tokens if self.wanted_tokens is not None else limits.default_max_tokens
        temperature = limits.default_temperature if self.temperature is None else self.temperature
        # A temperature this small is greedy decoding in all but name; 0 says so exactly.
        if temperature < MIN_TEMPERATURE:
            temperature = 0.0
        return GenerationSettings(max_new_tokens=max(1, min(wanted, cap, context - len(prompt))),
                                  temperature=float(temperature), top_k=self.top_k or 0,
                                  top_p=max(float(self.top_p if self.top_p is not None else 1.0), 1e-9),
                                  repetition_penalty=float(self.repetition_penalty or 1.0),
                                  seed=self.seed, stop=self.stop_list)


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
