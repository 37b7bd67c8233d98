"""The OpenAI-compatible API on a real uvicorn server (127.0.0.1, free port) with a small Gradio
page mounted at / as app.py mounts the playground: the official openai client (stream and not),
curl, the API key, limits and their 4xx answers, max tokens, stop strings, the busy answers."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time

import httpx
import pytest

from runtime import Engine, GenerationSettings
from server import Limits, create_api
from tests.api_support import ServerThread, SlowEngine, mount_small_page, tiny_model_dir, wait_until

openai = pytest.importorskip("openai")

MODEL = "tiny"
PROMPT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model_dir(), variant="ternary", threads=1)


@pytest.fixture(scope="module")
def served(engine):
    """(base url, api state): the API with a Gradio page mounted, open (no key)."""
    folder = tiny_model_dir()
    api = create_api({MODEL: engine, "tiny-int2": lambda: Engine(folder, variant="int2", threads=1)},
                     limits=Limits(max_body_bytes=64 * 1024, max_messages=16, default_max_tokens=16),
                     api_key=None)
    app = mount_small_page(api)
    with ServerThread(app) as url:
        yield url, api.state.bitnet


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


def greedy(engine, max_new_tokens, messages=PROMPT, **kw):
    return engine.generate(messages=messages, settings=GenerationSettings(max_new_tokens=max_new_tokens, **kw))


def post(url, body, **kw):
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=30, **kw)


# -- the openai client ------------------------------------------------------------------------
def test_models_listed(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, "tiny-int2"]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_matches_the_engine(client, engine):
    expected = greedy(engine, 12)
    out = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert out.usage.prompt_tokens == len(engine.prompt_ids(messages=PROMPT)) == expected.stats.prompt_tokens
    assert out.usage.completion_tokens == expected.stats.new_tokens
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    stats = out.model_extra["bitnet"]
    assert stats["new_tokens"] == expected.stats.new_tokens
    assert stats["decode_tokens_per_s"] > 0 and stats["ttft_s"] > 0 and stats["prefill_tokens_per_s"] > 0
    assert stats["variant"] == "ternary"


def test_streaming_matches_non_streaming(client, engine):
    expected = greedy(engine, 20)
    chunks = list(client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5  # really streamed
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert finals[0].model_extra["bitnet"]["new_tokens"] == 20
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_second_model_loads_on_first_use(client, engine):
    out = client.chat.completions.create(model="tiny-int2", messages=PROMPT, max_tokens=8, temperature=0)
    assert out.model_extra["bitnet"]["variant"] == "int2"
    # all variants compute the same function: same greedy tokens
    assert out.choices[0].message.content == greedy(engine, 8).text


def test_seed_makes_sampling_reproducible(client):
    def run(seed):
        return client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=16, temperature=1.0,
                                              top_p=0.95, seed=seed).choices[0].message.content
    assert run(7) == run(7)
    assert len({run(s) for s in (1, 2, 3)}) > 1


def test_tiny_temperature_is_greedy(client, engine):
    # a subnormal temperature used to overflow the logits into NaNs in the sampler
    out = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=8, temperature=1e-45)
    assert out.choices[0].message.content == greedy(engine, 8).text


def test_max_tokens_hit(client):
    out = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 5


def test_max_tokens_clamped_to_the_context(served, engine):
    url, _ = served
    n_prompt = len(engine.prompt_ids(messages=PROMPT))
    r = post(url, {"model": MODEL, "messages": PROMPT, "max_tokens": 100000, "temperature": 0})
    assert r.status_code == 200, r.text
    room = engine.context_length - n_prompt
    assert int(r.headers["x-bitnet-max-tokens"]) == room
    body = r.json()
    assert body["bitnet"]["max_tokens"] == room
    assert body["usage"]["completion_tokens"] <= room
    if body["choices"][0]["finish_reason"] == "length":
        assert body["usage"]["completion_tokens"] == room
        assert body["usage"]["total_tokens"] == engine.context_length


def test_default_max_tokens_applies(served):
    r = post(served[0], {"model": MODEL, "messages": PROMPT, "temperature": 0})
    assert r.status_code == 200 and r.json()["bitnet"]["max_tokens"] == 16


def test_stop_string_spanning_tokens(client, engine):
    full = greedy(engine, 12).text  # e.g. "w125 w72 w13 ..."
    words = full.split(" ")
    assert len(words) >= 4
    # the stop string starts inside the 2nd token and ends inside the 3rd
    stop = words[1][1:] + " " + words[2][:2]
    cut = full.index(stop)
    assert 0 < cut < len(full)
    out = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].message.content == full[:cut]
    assert out.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=12, temperature=0,
                                                 stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full[:cut]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_content_parts_and_developer_role(client, engine):
    msgs = [{"role": "developer", "content": "w5"},
            {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": " there"}]}]
    out = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    expected = greedy(engine, 6, messages=[{"role": "system", "content": "w5"}, PROMPT[0]])
    assert out.choices[0].message.content == expected.text


# -- curl and the page ------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_stream_and_not(served, engine):
    url, _ = served
    body = json.dumps({"model": MODEL, "messages": PROMPT, "max_tokens": 6, "temperature": 0})
    out = subprocess.run(["curl", "-sS", "--max-time", "30", url + "/v1/chat/completions",
                          "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert json.loads(out)["choices"][0]["message"]["content"] == greedy(engine, 6).text
    stream_body = json.dumps({"model": MODEL, "messages": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sSN", "--max-time", "30", url + "/v1/chat/completions",
                          "-H", "Content-Type: application/json", "-d", stream_body],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    events = [line[6:] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == greedy(engine, 6).text
    # curl -d without a JSON content type still works (the body is parsed as JSON regardless)
    out = subprocess.run(["curl", "-sS", "--max-time", "30", url + "/v1/models"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert json.loads(out)["data"][0]["id"] == MODEL


def test_gradio_page_is_mounted_beside_the_api(served):
    url, _ = served
    page = httpx.get(url + "/", timeout=30)
    assert page.status_code == 200 and "gradio" in page.text.lower()
    from gradio_client import Client

    assert Client(url + "/", verbose=False).predict("abc", api_name="/upper") == "ABC"


# -- limits: clear 4xx JSON answers -----------------------------------------------------------
def ok_body(**kw):
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": 2}
    body.update(kw)
    return body


BAD_BODIES = {
    "unknown model": (ok_body(model="gpt-4"), 404, "model_not_found"),
    "missing model": ({"messages": PROMPT}, 400, "missing_field"),
    "model not a string": (ok_body(model=3), 400, "invalid_type"),
    "missing messages": ({"model": MODEL}, 400, "missing_field"),
    "messages not a list": (ok_body(messages="hi"), 400, "invalid_type"),
    "empty messages": (ok_body(messages=[]), 400, "invalid_value"),
    "too many messages": (ok_body(messages=PROMPT * 17), 400, "too_many_messages"),
    "message not an object": (ok_body(messages=["hi"]), 400, "invalid_type"),
    "unknown role": (ok_body(messages=[{"role": "wizard", "content": "x"}]), 400, "unsupported_role"),
    "tool role": (ok_body(messages=[{"role": "tool", "content": "x"}]), 400, "unsupported_role"),
    "content a number": (ok_body(messages=[{"role": "user", "content": 5}]), 400, "invalid_type"),
    "image part": (ok_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
                   400, "unsupported_content"),
    "max_tokens a string": (ok_body(max_tokens="10"), 400, "invalid_type"),
    "max_tokens zero": (ok_body(max_tokens=0), 400, "invalid_value"),
    "max_tokens a float": (ok_body(max_tokens=2.5), 400, "invalid_type"),
    "max_tokens a bool": (ok_body(max_tokens=True), 400, "invalid_type"),
    "temperature too high": (ok_body(temperature=5), 400, "invalid_value"),
    "temperature a string": (ok_body(temperature="hot"), 400, "invalid_type"),
    "top_p above 1": (ok_body(top_p=1.5), 400, "invalid_value"),
    "seed a float": (ok_body(seed=1.5), 400, "invalid_type"),
    "stop a number": (ok_body(stop=5), 400, "invalid_type"),
    "too many stops": (ok_body(stop=["a", "b", "c", "d", "e"]), 400, "invalid_value"),
    "stream a string": (ok_body(stream="yes"), 400, "invalid_type"),
    "n = 2": (ok_body(n=2), 400, "unsupported"),
    "tools": (ok_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported"),
    "body an array": ([1, 2], 400, "invalid_type"),
    "prompt longer than the context": (ok_body(messages=[{"role": "user", "content": "w5 " * 300}]), 400,
                                       "context_length_exceeded"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_request_gets_a_clear_4xx(served, case):
    body, status, code = BAD_BODIES[case]
    r = post(served[0], body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and isinstance(err["message"], str) and len(err["message"]) > 10


def test_too_long_names_the_apis_own_remedy(served):
    """An HTTP client has no settings.truncate; the error says what to shorten."""
    r = post(served[0], ok_body(messages=[{"role": "user", "content": "w5 " * 300}]))
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "messages"
    assert "truncate" not in err["message"] and "fewer or shorter messages" in err["message"]
    assert "tokens" in err["message"] and "context holds" in err["message"]


def test_any_name_reaches_the_one_model_and_documented_names_resolve(engine):
    """One model served: any name is that model (the answer names the real id);
    several: the id's last part in any case resolves, unknown names are 404."""
    api = create_api({"microsoft/bitnet-b1.58-2B-4T": engine}, api_key=None)
    with ServerThread(api) as url:
        r = post(url, ok_body(model="gpt-4o"))
        assert r.status_code == 200 and r.json()["model"] == "microsoft/bitnet-b1.58-2B-4T"
        ids = [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]]
        assert ids == ["microsoft/bitnet-b1.58-2B-4T"]
        assert httpx.get(url + "/v1/models/bitnet-b1.58-2B-4T", timeout=10).json()["id"] == ids[0]
    api = create_api({"microsoft/bitnet-b1.58-2B-4T": engine, "other": engine}, api_key=None)
    with ServerThread(api) as url:
        r = post(url, ok_body(model="BITNET-b1.58-2b-4t"))
        assert r.status_code == 200 and r.json()["model"] == "microsoft/bitnet-b1.58-2B-4T"
        assert post(url, ok_body(model="gpt-4o")).status_code == 404


@pytest.mark.parametrize("raw,code", [(b"{not json", "invalid_json"), (b"", "invalid_json"),
                                      (b'{"model": NaN}', "invalid_json"), (b"\xff\xfe{}", "invalid_json"),
                                      (b"[" * 100000 + b"]" * 100000, "body_too_large"),
                                      (b"[" * 20000 + b"]" * 20000, "invalid_json")])
def test_malformed_bodies(served, raw, code):
    r = httpx.post(served[0] + "/v1/chat/completions", content=raw, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code in (400, 413), r.text
    assert r.json()["error"]["code"] == code


def test_body_size_limit_without_content_length(served):
    def gen():
        for _ in range(100):
            yield b" " * 1024  # 100 KiB > the 64 KiB limit, chunked (no Content-Length)
    r = httpx.post(served[0] + "/v1/chat/completions", content=gen(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_unknown_route_and_method(served):
    r = httpx.get(served[0] + "/v1/completions-old", timeout=10)
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]
    r = httpx.get(served[0] + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_client_library_sees_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=PROMPT)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=PROMPT, temperature=9)


# -- API key ------------------------------------------------------------------------------------
def test_api_key_required_when_set(engine, monkeypatch):
    monkeypatch.setenv("BITNET_API_KEY", "s3cret-key")
    api = create_api({MODEL: engine}, limits=Limits())  # key from the environment
    state = api.state.bitnet
    with ServerThread(api) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"},
                        {"Authorization": "Basic s3cret-key"}):
            r = post(url, ok_body(), headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
            assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        assert state.gate.counters["admitted"] == 0  # no generation was even queued
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=2)
        assert state.gate.counters["admitted"] == 0
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret-key", max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(url + "/v1/health", timeout=10).status_code == 200  # health stays open


def test_api_open_without_key(engine, monkeypatch):
    monkeypatch.delenv("BITNET_API_KEY", raising=False)
    api = create_api({MODEL: engine}, limits=Limits())
    with ServerThread(api) as url:
        assert post(url, ok_body()).status_code == 200


# -- busy: a full queue and a queue timeout ---------------------------------------------------
def _stream_in_thread(url, body, results, key):
    def run():
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
                results[key] = (r.status_code, r.read().decode())
        except Exception as e:  # recorded for the assertion
            results[key] = ("exception", repr(e))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_full_queue_gets_429_with_retry_after(engine):
    slow = SlowEngine(engine, delay_s=0.02)
    api = create_api({MODEL: slow}, limits=Limits(concurrency=1, queue_size=1), api_key=None)
    state = api.state.bitnet
    with ServerThread(api) as url:
        results = {}
        body = ok_body(max_tokens=40, stream=True, temperature=0)
        t1 = _stream_in_thread(url, body, results, "running")
        assert wait_until(lambda: state.gate.running == 1)
        t2 = _stream_in_thread(url, body, results, "waiting")
        assert wait_until(lambda: state.gate.waiting == 1)
        r = post(url, ok_body())
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "server_busy" and "retry after" in r.json()["error"]["message"]
        t1.join(30), t2.join(30)
        for key in ("running", "waiting"):
            status, text = results[key]
            assert status == 200 and text.rstrip().endswith("data: [DONE]"), results[key]
        assert wait_until(state.engine_idle)


def test_queue_timeout_gets_503_with_retry_after(engine):
    slow = SlowEngine(engine, delay_s=0.02)
    api = create_api({MODEL: slow}, limits=Limits(concurrency=1, queue_size=4, queue_timeout_s=0.3), api_key=None)
    state = api.state.bitnet
    with ServerThread(api) as url:
        results = {}
        # greedy: this prompt gives 120 tokens without a stop token (a sampled answer may stop early)
        t1 = _stream_in_thread(url, ok_body(max_tokens=60, stream=True, temperature=0), results, "running")
        assert wait_until(lambda: state.gate.running == 1)
        t0 = time.monotonic()
        r = post(url, ok_body())
        assert r.status_code == 503 and time.monotonic() - t0 < 5
        assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_timeout"
        t1.join(30)
        assert results["running"][0] == 200
        assert wait_until(state.engine_idle)
        assert post(url, ok_body()).status_code == 200  # and the server serves again


def test_install_on_gradios_own_server(engine):
    """The other way to serve both (keeps demo.launch(share=...)): add the routes to Gradio's
    app after launch, in front of Gradio's own routes."""
    import gradio as gr

    from server import install_api
    from tests.api_support import free_port

    with gr.Blocks() as demo:
        gr.Markdown("page")
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        state = install_api(demo.app, {MODEL: engine}, limits=Limits(), api_key=None, first=True)
        url = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        chunks = list(client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=6, temperature=0,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == greedy(engine, 6).text
        assert httpx.get(url + "/", timeout=30).status_code == 200
        assert wait_until(state.engine_idle)
    finally:
        demo.close()
