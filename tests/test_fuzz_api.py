"""Property-based fuzz of the HTTP API (hypothesis): random JSON documents, valid requests with
one field replaced by random JSON, random message lists, raw bytes and odd headers, sent to a
real server on 127.0.0.1. The server must never crash, never answer 500 without a message,
answer every error as OpenAI-style JSON, and finish every stream with [DONE]."""

from __future__ import annotations

import collections
import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime import Engine
from server import Limits, create_api
from tests.api_support import ServerThread, tiny_model_dir, wait_until

EXAMPLES = int(os.environ.get("BITNET_FUZZ_API_EXAMPLES", 80))
MODEL = "tiny"
ALLOWED = {200, 400, 401, 404, 405, 408, 413, 429, 503}
SEEN = collections.Counter()  # status codes per test, for the report

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "stream", "stream_options", "n", "tools", "response_format", "repetition_penalty",
          "frequency_penalty", "presence_penalty", "logprobs"]
roles = st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", ""]),
                  json_values)
contents = st.one_of(st.text(max_size=60), json_values,
                     st.lists(st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
                                        st.dictionaries(st.sampled_from(["type", "text", "image_url"]), json_values,
                                                        max_size=3)), max_size=3))
# any code point, lone surrogates and control characters included (json.dumps escapes them)
any_text = st.text(alphabet=st.characters(blacklist_categories=()), max_size=80)
valid_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                                       "content": st.one_of(any_text, st.lists(st.fixed_dictionaries(
                                           {"type": st.just("text"), "text": any_text}), max_size=3))})
messages = st.lists(st.one_of(valid_message, st.fixed_dictionaries({"role": roles, "content": contents}),
                              json_values), min_size=0, max_size=10)


@pytest.fixture(scope="module")
def server():
    engine = Engine(tiny_model_dir(), variant="ternary", threads=1)
    # generations are capped at 6 tokens so that valid fuzz bodies stay cheap
    api = create_api({MODEL: engine}, limits=Limits(max_body_bytes=16 * 1024, max_messages=8, max_tokens_cap=6,
                                                    default_max_tokens=4, queue_size=4), api_key=None)
    with ServerThread(api) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client, api.state.bitnet
    print("\nAPI fuzz, status codes seen per test: " + json.dumps({k: dict(v) for k, v in _by_test.items()}))


_by_test: dict = collections.defaultdict(collections.Counter)


def check(test: str, r: httpx.Response, stream: bool = False) -> None:
    _by_test[test][r.status_code] += 1
    assert r.status_code in ALLOWED, (r.status_code, r.text[:500])
    if r.status_code == 200:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
            for line in r.text.splitlines():
                if line.startswith("data: {"):
                    assert "error" not in json.loads(line[6:]), line
        else:
            out = r.json()
            assert out.get("object") in ("chat.completion", "list", "model") or "status" in out, out
        return
    err = r.json()["error"]  # every error is JSON with a message
    assert isinstance(err["message"], str) and err["message"].strip(), r.text
    assert r.status_code != 500


def post_json(client, body) -> httpx.Response:
    # json.dumps escapes lone surrogates as \udXXX (httpx's json= cannot encode them)
    return client.post("/v1/chat/completions", content=json.dumps(body),
                       headers={"content-type": "application/json"})


def valid_body():
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=json_values)
def test_random_json_documents(server, body):
    client, _ = server
    check("random_json", post_json(client, body))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS), value=json_values, drop=st.booleans())
def test_one_field_replaced(server, field, value, drop):
    client, _ = server
    body = valid_body()
    if drop and field in body:
        del body[field]
    else:
        body[field] = value
    check("one_field", post_json(client, body))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=messages, stream=st.booleans(), stop=st.one_of(st.none(), st.text(max_size=5),
                                                         st.lists(st.text(max_size=5), max_size=5)))
def test_random_messages(server, msgs, stream, stop):
    client, _ = server
    body = {"model": MODEL, "messages": msgs, "stream": stream, "max_tokens": 4}
    if stop is not None:
        body["stop"] = stop
    check("messages", post_json(client, body))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=st.lists(valid_message, min_size=1, max_size=8), stream=st.booleans(),
       temperature=st.one_of(st.none(), st.floats(0, 2)), top_p=st.one_of(st.none(), st.floats(0, 1)),
       seed=st.one_of(st.none(), st.integers(-2**70, 2**70)), stop=st.lists(any_text.filter(lambda t: len(t) < 20),
                                                                        max_size=4))
@pytest.mark.filterwarnings("error::RuntimeWarning")  # e.g. overflow in the sampler
def test_well_formed_requests_with_odd_text(server, msgs, stream, temperature, top_p, seed, stop):
    """Valid structure, hostile text and edge values: these generate (or say the prompt is
    too long), never anything else."""
    client, _ = server
    body = {"model": MODEL, "messages": msgs, "stream": stream, "max_tokens": 4, "stop": stop,
            "temperature": temperature, "top_p": top_p, "seed": seed}
    r = post_json(client, body)
    check("well_formed", r)
    assert r.status_code == 200 or r.json()["error"]["code"] == "context_length_exceeded", r.text


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                     json_values.map(lambda v: json.dumps(v).encode()[:-1])),  # truncated JSON
       ctype=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                              "multipart/form-data", "", "application/json; charset=latin-1"]),
       path=st.sampled_from(["/v1/chat/completions", "/v1/models", "/v1/chat/completions/", "/v1/embeddings"]),
       method=st.sampled_from(["POST", "GET", "PUT", "DELETE"]))
def test_raw_bytes_and_odd_requests(server, raw, ctype, path, method):
    client, _ = server
    headers = {"content-type": ctype} if ctype else {}
    r = client.request(method, path, content=raw if method in ("POST", "PUT") else None, headers=headers)
    if r.status_code in (404, 405) and "error" not in r.text:
        pytest.fail(f"{method} {path}: {r.status_code} without our JSON error: {r.text[:200]}")
    check("raw", r)


def test_server_is_idle_and_healthy_after_the_fuzz(server):
    client, state = server
    assert wait_until(state.engine_idle, timeout=5)
    r = client.post("/v1/chat/completions", json=valid_body())
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    report = os.environ.get("BITNET_FUZZ_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump({k: dict(v) for k, v in _by_test.items()}, f, indent=2)
