"""The chat-completions request, as pydantic models (the shape FastAPI apps give their
requests), and the one function that turns a validation error into OpenAI's error shape.

    req = parse_chat_request(json_body, limits)   # ChatRequest, or ApiError 400 naming the field

The models say the types and ranges; `to_api_error` maps pydantic's first error to our codes
(missing_field / invalid_type / invalid_value / unsupported*), with `param` from the error's
location (`messages[0].content`). Limits that come from the server's configuration (how many
messages, stop strings) are checked after validation.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .errors import ApiError, bad
from .limits import Limits

ROLE_MAP = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED = ("tools", "tool_choice", "logprobs", "top_logprobs", "logit_bias")

Int = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Bool = Annotated[bool, Field(strict=True)]


def _type_name(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(v), type(v).__name__)


OUR_CODES = ("invalid_type", "unsupported", "unsupported_role", "unsupported_content")


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
    stop: Optional[Union[Annotated[str, Field(strict=True)], list[Annotated[str, Field(strict=True)]]]] = None
    response_format: Optional[ResponseFormat] = None

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
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def chat(self) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


# pydantic's error types -> our codes (custom errors carry their code as their type)
_CODES = {"missing": "missing_field", "literal_error": "unsupported", "finite_number": "invalid_value",
          "too_short": "invalid_value", "too_long": "invalid_value"}
_RANGE = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _param(loc) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_null_content()]",) or "[" in str(part) and "(" in str(part):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or None


def _field_param(loc) -> str | None:
    """Only the named fields of the location (pydantic adds union member tags like 'str')."""
    keep = [p for p in loc if isinstance(p, int) or p in ChatRequest.model_fields
            or p in Message.model_fields or p in StreamOptions.model_fields or p in ("type",)]
    return _param(keep)


def to_api_error(err: ValidationError) -> ApiError:
    """The first validation error as OpenAI's error shape: 400, code, param, a message that
    names the field."""
    e = err.errors(include_url=False)[0]
    kind, loc = e["type"], e["loc"]
    param = _field_param(loc) or (e.get("ctx") or {}).get("param")
    if kind in OUR_CODES:  # raised by our validators: the message is written for the client
        code, msg = kind, e["msg"]
        where = _field_param(loc)
        message = msg if not where else f"{where}{msg}" if msg.startswith("[") else f"{where}: {msg}"
    elif param == "stop" and kind.endswith("_type"):
        code, message = "invalid_type", "stop must be a string or an array of strings"
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
    """A decoded JSON body as a ChatRequest; ApiError (400) naming the first problem."""
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        raise to_api_error(e) from None
    if len(req.messages) > limits.max_messages:
        raise bad(f"too many messages: {len(req.messages)} (the limit is {limits.max_messages})",
                  "messages", "too_many_messages")
    stop = req.stop_list
    if len(stop) > limits.max_stop:
        raise bad(f"at most {limits.max_stop} stop strings, got {len(stop)}", "stop")
    if any(len(s) > limits.max_stop_chars for s in stop):
        raise bad(f"a stop string may have at most {limits.max_stop_chars} characters", "stop")
    if req.seed is not None:
        req.seed %= 1 << 64  # any integer, as OpenAI accepts; numpy wants it non-negative
    if req.temperature is not None and not math.isfinite(req.temperature):
        raise bad("temperature must be finite", "temperature")
    return req
