"""The API beyond plain chat, on a real uvicorn server over the tiny model: /v1/completions
(text and token-id prompts, echo, logprobs, max_tokens 0), chat logprobs (streamed too), n > 1
through the batcher, the penalties, unknown fields refused, /health while loading, /metrics,
SSE keep-alive while a stream waits, and the tokenizer routes."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest

from runtime import Engine, GenerationSettings
from runtime.batcher import BatchedEngine
from server import Limits, create_api
from tests.api_support import ServerThread, SlowEngine, tiny_model_dir, wait_until

openai = pytest.importorskip("openai")

PROMPT = [{"role": "user", "content": "hello there"}]
TEXT = "w5 w17 w33 w100"


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model_dir(), variant="ternary", threads=1)


@pytest.fixture(scope="module")
def served(engine):
    """(url, state): "tiny" on the plain engine, "tiny-batched" through a 3-slot batcher."""
    batched = BatchedEngine(engine, slots=3, prefill_chunk=8)
    api = create_api({"tiny": engine, "tiny-batched": batched},
                     limits=Limits(concurrency=3, default_max_tokens=8), api_key=None)
    with ServerThread(api) as url:
        yield url, api.state.bitnet
    batched.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=60, **kw)


# -- /v1/completions ----------------------------------------------------------------------------
def test_text_and_token_prompts_generate_what_the_engine_does(client, engine):
    expected = engine.generate(prompt=TEXT, settings=GenerationSettings(max_new_tokens=6))
    out = client.completions.create(model="tiny", prompt=TEXT, max_tokens=6, temperature=0)
    assert out.object == "text_completion" and out.choices[0].text == expected.text
    assert out.usage.prompt_tokens == len(engine.prompt_ids(prompt=TEXT))
    ids = engine.prompt_ids(prompt=TEXT)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == expected.text


def test_echo_logprobs_score_the_prompt(served, engine):
    ids = engine.prompt_ids(prompt=TEXT)
    r = post(served[0], "/v1/completions", {"model": "tiny", "prompt": [ids, ids[:3]], "max_tokens": 0,
                                            "echo": True, "logprobs": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    expected = engine.score(ids, top=2)
    lp = out["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:], [s.logprob for s in expected], rtol=0, atol=1e-6)
    assert all(len(top) <= 2 for top in lp["top_logprobs"][1:])
    assert len(out["choices"][1]["logprobs"]["tokens"]) == 3
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 0
    assert out["usage"]["prompt_tokens"] == len(ids) + 3
    assert out["bitnet"]["logprobs_head"] == "native"


def test_the_lm_eval_request_shape(served, engine):
    """What lm-eval's local-completions sends for a loglikelihood: token ids, echo, logprobs 1,
    max_tokens 1; it reads token_logprobs[ctxlen:-1] and compares with top_logprobs."""
    ids = engine.prompt_ids(prompt=TEXT)
    r = post(served[0], "/v1/completions", {"model": "tiny", "prompt": [ids], "max_tokens": 1, "echo": True,
                                            "logprobs": 1, "temperature": 0, "seed": 1234})
    out = r.json()["choices"][0]
    lp = out["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then the generated token
    expected = engine.score(ids)
    np.testing.assert_allclose(lp["token_logprobs"][1:-1], [s.logprob for s in expected], rtol=0, atol=1e-6)
    generated = engine.generate(prompt=TEXT, settings=GenerationSettings(max_new_tokens=1))
    assert out["text"].endswith(generated.text)


def test_chat_logprobs_streamed_and_not(client, engine):
    settings = GenerationSettings(max_new_tokens=6, stop_token_ids=[], logprobs=3)
    expected = engine.generate(messages=PROMPT, settings=settings)
    out = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    shown = [lp for lp, t in zip(expected.logprobs, expected.token_ids) if t not in engine.stop_token_ids]
    assert [c.logprob for c in content] == pytest.approx([lp.logprob for lp in shown], abs=1e-6)
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token for c in content)
    assert "".join(c.token for c in content) == out.choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.logprob for c in streamed] == [c.logprob for c in content]


def test_n_choices_share_the_batchers_prefill(client, served):
    out = client.chat.completions.create(model="tiny-batched", messages=PROMPT, max_tokens=8, temperature=1.0,
                                         seed=3, n=3)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert len({c.message.content for c in out.choices}) > 1  # seeds 3, 4, 5
    again = client.chat.completions.create(model="tiny-batched", messages=PROMPT, max_tokens=8, temperature=1.0,
                                           seed=3, n=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]
    r = post(served[0], "/v1/chat/completions", {"model": "tiny", "messages": PROMPT, "n": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported" and "batcher" in r.text
    r = post(served[0], "/v1/chat/completions", {"model": "tiny-batched", "messages": PROMPT, "n": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    texts = client.completions.create(model="tiny-batched", prompt=[TEXT, "w7 w8"], max_tokens=4, n=2,
                                      temperature=1.0, seed=1)
    assert [c.index for c in texts.choices] == [0, 1, 2, 3]


def test_penalties_act(client, engine):
    plain = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=24, temperature=0)
    penalized = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=24, temperature=0,
                                               frequency_penalty=2.0, presence_penalty=2.0)
    expected = engine.generate(messages=PROMPT, settings=GenerationSettings(
        max_new_tokens=24, frequency_penalty=2.0, presence_penalty=2.0))
    assert penalized.choices[0].message.content == expected.text
    assert penalized.choices[0].message.content != plain.choices[0].message.content


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"model": "tiny", "messages": PROMPT, "metadata": {"a": 1}}, "metadata"),
    ("/v1/chat/completions", {"model": "tiny", "messages": PROMPT, "logit_bias": {"5": 3}}, "logit_bias"),
    ("/v1/chat/completions", {"model": "tiny", "messages": PROMPT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": TEXT, "suffix": "x"}, "suffix"),
    ("/v1/completions", {"model": "tiny", "prompt": TEXT, "best_of": 3}, "best_of"),
    ("/v1/completions", {"model": "tiny", "prompt": [-1]}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [10 ** 6]}, "prompt"),
    ("/v1/completions", {"model": "tiny"}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": TEXT, "max_tokens": 0, "stream": True}, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": TEXT, "logprobs": 21}, "logprobs"),
])
def test_every_other_field_is_refused_by_name(served, path, body, param):
    r = post(served[0], path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_user_is_recorded(served):
    url, state = served
    r = post(url, "/v1/chat/completions", {"model": "tiny", "messages": PROMPT, "max_tokens": 1, "user": "ann"})
    assert r.status_code == 200
    assert [rec.user for rec in state.records() if rec.id == r.json()["id"]] == ["ann"]


# -- health, metrics, tokenizer ------------------------------------------------------------------
def test_health_is_503_while_loading(engine):
    ready = threading.Event()
    api = create_api(lambda: {"tiny": engine} if ready.is_set() else None, api_key=None)
    with ServerThread(api) as url:
        for path in ("/health", "/v1/health"):
            r = httpx.get(url + path)
            assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["retry-after"]
        ready.set()
        for path in ("/health", "/v1/health"):
            r = httpx.get(url + path)
            assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["models"] == ["tiny"]


def test_metrics_count_requests_tokens_and_batches(served):
    from prometheus_client.parser import text_string_to_metric_families

    url, _ = served
    post(url, "/v1/chat/completions", {"model": "tiny-batched", "messages": PROMPT, "max_tokens": 5, "n": 2,
                                       "temperature": 1.0})
    post(url, "/v1/chat/completions", {"model": "tiny", "messages": PROMPT, "foo": 1})
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(r.text) for s in f.samples}
    assert samples[("bitnet_requests_total", (("path", "/v1/chat/completions"), ("status", "200")))] >= 1
    assert samples[("bitnet_requests_total", (("path", "/v1/chat/completions"), ("status", "400")))] >= 1
    assert samples[("bitnet_completion_tokens_total", ())] >= 2
    assert samples[("bitnet_prompt_tokens_total", ())] >= 1
    assert samples[("bitnet_time_to_first_token_seconds_count", ())] >= 2
    assert samples[("bitnet_time_between_tokens_seconds_count", ())] >= 1
    assert samples[("bitnet_batch_size_count", ())] >= 1 and samples[("bitnet_batch_size_sum", ())] >= 2
    assert ("bitnet_queue_length", ()) in samples


def test_tokenizer_routes(served, engine):
    url, _ = served
    # two models served here: they are named (a server of one model needs no name, as lm-eval sends none)
    assert httpx.get(url + "/tokenizer_info").status_code == 404
    info = httpx.get(url + "/tokenizer_info", params={"model": "tiny"}).json()
    assert info["eos_token"] == engine.config.get("eos_token") and info["model_max_length"] == engine.context_length
    ids = httpx.post(url + "/tokenize", json={"prompt": TEXT, "add_special_tokens": False, "model": "tiny"}).json()
    assert ids["tokens"] == engine.tokenizer.encode(TEXT, add_special_tokens=False).ids
    back = httpx.post(url + "/detokenize", json={"tokens": ids["tokens"], "model": "tiny"}).json()["prompt"]
    assert back == engine.tokenizer.decode(ids["tokens"])
    assert httpx.post(url + "/tokenize", json={"text": 1, "model": "tiny"}).status_code == 400


# -- SSE keep-alive --------------------------------------------------------------------------------
def test_a_queued_stream_gets_keepalives_within_the_clients_read_timeout(engine):
    """The CPU is busy for ~4 s; a second stream waits in the queue. Its client gives up after
    1 s without a byte; keep-alive comments every 0.25 s hold the connection until its turn."""
    slow = SlowEngine(engine, delay_s=0.1)
    api = create_api({"tiny": slow}, limits=Limits(concurrency=1, keepalive_s=0.25), api_key=None)
    state = api.state.bitnet
    body = {"model": "tiny", "messages": PROMPT, "max_tokens": 40, "temperature": 0, "stream": True}
    with ServerThread(api) as url:
        first = threading.Thread(target=lambda: httpx.post(url + "/v1/chat/completions", json=body, timeout=60))
        first.start()
        assert wait_until(lambda: state.gate.running == 1)
        t0 = time.monotonic()
        lines, first_data = [], None
        timeout = httpx.Timeout(connect=5, read=1.0, write=5, pool=5)
        with httpx.stream("POST", url + "/v1/chat/completions", json=dict(body, max_tokens=3), timeout=timeout) as r:
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: {") and first_data is None:
                    first_data = time.monotonic() - t0
        first.join()
    assert first_data is not None and first_data > 2.0  # it waited longer than two read timeouts
    assert lines.count(": keep-alive") >= 4
    assert lines[-1] == "data: [DONE]" or lines[-2] == "data: [DONE]"
    texts = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert texts[-1]["usage"]["completion_tokens"] == 3


def test_python_m_server_loads_in_the_background_and_reports_a_failed_load(tmp_path):
    """The folder and variant are checked at once (exit 2); the model then loads while /health
    answers 503; a model that cannot load stops the server with exit code 2 and the reason."""
    import os
    import shutil
    import subprocess
    import sys

    from tests.api_support import free_port

    folder = tmp_path / "broken"
    shutil.copytree(tiny_model_dir(), folder)
    (folder / "model.int2.onnx").write_bytes(b"not an onnx model")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    p = subprocess.run([sys.executable, "-m", "server", str(folder), "--variant", "int2", "--port", str(free_port())],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and "cannot load" in p.stderr, (p.returncode, p.stderr[-2000:])
    p = subprocess.run([sys.executable, "-m", "server", str(tmp_path / "missing"), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and "does not exist" in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0]"),
    ({"messages": PROMPT, "stream_options": {"include_usage": True, "continuous": True}}, "stream_options"),
])
def test_unknown_keys_inside_parts_are_refused(served, body, param):
    r = post(served[0], "/v1/chat/completions", dict(body, model="tiny", max_tokens=1))
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    # null is as good as absent: a previous answer's message sent back as it came
    again = [{"role": "assistant", "content": "w5", "refusal": None, "tool_calls": None}, PROMPT[0]]
    assert post(served[0], "/v1/chat/completions", {"model": "tiny", "messages": again, "max_tokens": 1}).status_code == 200


def test_streamed_completion_with_echo(client, engine):
    expected = engine.generate(prompt=TEXT, settings=GenerationSettings(max_new_tokens=5))
    for logprobs in (None, 1):
        chunks = list(client.completions.create(model="tiny", prompt=TEXT, max_tokens=5, temperature=0, echo=True,
                                                logprobs=logprobs, stream=True))
        text = "".join(c.text for ch in chunks for c in ch.choices)
        assert text == TEXT + expected.text
        if logprobs:
            lps = [v for ch in chunks for c in ch.choices if c.logprobs for v in c.logprobs.token_logprobs]
            assert lps[0] is None and len(lps) == len(engine.prompt_ids(prompt=TEXT)) + len(expected.token_ids)


def test_every_accepted_and_refused_field_is_documented():
    """docs/SERVING.md names every field the request models take and every one they refuse."""
    from pathlib import Path

    from server.requests import UNSUPPORTED, ChatRequest, CompletionRequest

    doc = (Path(__file__).resolve().parent.parent / "docs" / "SERVING.md").read_text()
    fields = set(ChatRequest.model_fields) | set(CompletionRequest.model_fields) | set(UNSUPPORTED)
    missing = sorted(f for f in fields if f"`{f}`" not in doc and f"`{f}:" not in doc)
    assert not missing, missing
