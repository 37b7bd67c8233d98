"""The playground launched for real (`python app.py` on a local port, tiny exported model),
driven with gradio_client through its stable API names (/chat, /retry, /stop, /clear, /status).
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("gradio_client")

from playground.service import WAITING  # noqa: E402
from tests.test_app_common import AppServer, make_tiny_model  # noqa: E402

# /chat outputs, in order
MSG, CHAT_T, CHAT_B, STATS_T, STATS_B, SUMMARY, SPEED, TIMELINE, RAW = range(9)
SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("app-model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with AppServer(model_dir, tmp_path_factory.mktemp("app-run")) as srv:
        yield srv


@pytest.fixture(scope="module")
def engine(model_dir):
    """An engine in the test process, to count the tokens the app should report."""
    from runtime import Engine

    return Engine(model_dir, "ternary", threads=1)


def chat_args(message, hist_t=(), hist_b=(), baseline="int2", max_new_tokens=24, temperature=0.0,
              seed=7):
    return dict(message=message, history_ternary=list(hist_t), history_baseline=list(hist_b),
                system_prompt=SYSTEM, baseline=baseline, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=seed,
                api_name="/chat")


def is_skip(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update"


def text_of(message) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return content


def wait_idle(client, timeout=10.0) -> dict:
    deadline = time.time() + timeout
    while True:
        status = client.predict(api_name="/status")
        busy = status["active_generations"] or any(status["engine_active_generations"].values())
        if not busy or time.time() > deadline:
            return status
        time.sleep(0.1)


def test_status_ready(server):
    status = server.client().predict(api_name="/status")
    assert status["state"] == "ready"
    assert status["fallback"] is False and status["untrained"] is False
    assert status["variants"] == ["ternary", "int2", "int4", "fp32"]
    assert status["baselines"] == ["int2", "int4", "fp32", "none"]
    assert status["loaded_engines"] == ["ternary", "int2"]  # default baseline preloaded


def test_chat_streams_both_panes_one_after_the_other(server, engine):
    client = server.client()
    job = client.submit(**chat_args("Hello there, how are you?", max_new_tokens=24))
    final = job.result(timeout=60)
    outputs = job.outputs()
    assert len(outputs) >= 3, "expected several streamed updates"
    # While the ternary engine answers, the baseline pane waits (never both at once).
    waiting = [o for o in outputs if not is_skip(o[CHAT_T]) and not is_skip(o[CHAT_B])
               and text_of(o[CHAT_T][-1]) and text_of(o[CHAT_B][-1]) == WAITING]
    assert waiting, "no update showed the ternary answer while the baseline waited"
    assert final[MSG] == "" or is_skip(final[MSG])

    raw = final[RAW]
    assert set(raw) == {"ternary", "int2"}
    expected_prompt = len(engine.prompt_ids(messages=[{"role": "system", "content": SYSTEM},
                                                      {"role": "user", "content": "Hello there, how are you?"}]))
    for variant, pane in (("ternary", CHAT_T), ("int2", CHAT_B)):
        r = raw[variant]
        s = r["stats"]
        assert r["finish_reason"] in ("stop", "length")
        assert s["prompt_tokens"] == expected_prompt
        assert 1 <= s["new_tokens"] <= 24
        if r["finish_reason"] == "length":
            assert s["new_tokens"] == 24
        # byte-level tokenizer, printable bytes only: one generated token is one byte of text
        ended_by_stop_token = 1 if r["finish_reason"] == "stop" else 0
        assert len(r["text"].encode()) == s["new_tokens"] - ended_by_stop_token
        assert s["ttft_s"] > 0 and s["prefill_tokens_per_s"] > 0 and s["rss_mb"] > 0
        if s["new_tokens"] > 1:
            assert s["decode_tokens_per_s"] > 0
        assert s["variant"] == variant
        pane_msgs = final[pane]
        assert [m["role"] for m in pane_msgs] == ["user", "assistant"]
        assert text_of(pane_msgs[0]) == "Hello there, how are you?"
        assert text_of(pane_msgs[1]) == r["text"] or not r["text"]
    # greedy: the baseline computes the same function, so it writes the same text
    assert raw["ternary"]["text"] == raw["int2"]["text"]
    assert "TTFT" in final[STATS_T] and "decode" in final[STATS_T] and "weights" in final[STATS_T]
    assert "int2" in final[STATS_B] and "TTFT" in final[STATS_B]
    assert "Speed-up" in final[SUMMARY] and "memory" in final[SUMMARY]
    speed = {row[0]: row[1] for row in final[SPEED]["data"]}
    assert set(speed) == {"ternary", "int2"} and all(v >= 0 for v in speed.values())
    engines_in_timeline = {row[2] for row in final[TIMELINE]["data"]}
    assert engines_in_timeline == {"ternary", "int2"}
    last_t = [row for row in final[TIMELINE]["data"] if row[2] == "ternary"][-1]
    assert last_t[1] == raw["ternary"]["stats"]["new_tokens"]


def test_multi_turn_history_blocks_and_html_as_text(server, engine):
    client = server.client()
    first_msg = "<script>alert(1)</script> & hi"
    first = client.predict(**chat_args(first_msg, max_new_tokens=8))
    hist_t, hist_b = first[CHAT_T], first[CHAT_B]
    # the chatbot shows the markup as text: escaped, never live HTML
    assert text_of(hist_t[0]) == "&lt;script&gt;alert(1)&lt;/script&gt; &amp; hi"
    assert isinstance(hist_t[0]["content"], list)  # Gradio 6 gives content as blocks
    second = client.predict(**chat_args("And then?", hist_t, hist_b, max_new_tokens=8))
    answer1 = first[RAW]["ternary"]["text"]
    expected = engine.prompt_ids(messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": first_msg},
        {"role": "assistant", "content": answer1}, {"role": "user", "content": "And then?"}])
    assert second[RAW]["ternary"]["stats"]["prompt_tokens"] == len(expected)
    assert [m["role"] for m in second[CHAT_T]] == ["user", "assistant"] * 2
    assert [m["role"] for m in second[CHAT_B]] == ["user", "assistant"] * 2

    # retry answers the last message again, replacing (not adding) the exchange
    retried = client.predict(history_ternary=second[CHAT_T], history_baseline=second[CHAT_B],
                             system_prompt=SYSTEM, baseline="int2", max_new_tokens=8,
                             temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=7,
                             api_name="/retry")
    assert len(retried[CHAT_T]) == 4 and text_of(retried[CHAT_T][2]) == "And then?"
    assert retried[RAW]["ternary"]["text"] == second[RAW]["ternary"]["text"]  # greedy

    cleared = client.predict(api_name="/clear")
    assert cleared[0] == [] and cleared[1] == []


def test_baseline_choice_and_none(server):
    client = server.client()
    out = client.predict(**chat_args("Compare with fp32", baseline="fp32", max_new_tokens=6))
    assert set(out[RAW]) == {"ternary", "fp32"}
    assert out[RAW]["fp32"]["text"] == out[RAW]["ternary"]["text"]
    status = client.predict(api_name="/status")
    assert status["loaded_engines"] == ["ternary", "fp32"]  # at most one baseline kept
    out = client.predict(**chat_args("No baseline now", baseline="none", max_new_tokens=6))
    assert set(out[RAW]) == {"ternary"}
    assert out[CHAT_B] == []  # the baseline pane is left as it was
    assert "none selected" in out[STATS_B]
    assert "no baseline" in out[SUMMARY]


def test_empty_message_does_nothing(server):
    client = server.client()
    for message in ("", "   ", "\n\t"):
        out = client.predict(**chat_args(message))
        assert out[CHAT_T] == [] and out[CHAT_B] == []
        assert all(is_skip(v) for v in out[:1] + out[STATS_T:]), out
    # after a conversation: the page stays exactly as it was
    before = client.predict(**chat_args("Hi", max_new_tokens=4))
    after = client.predict(**chat_args("  ", before[CHAT_T], before[CHAT_B]))
    assert after[CHAT_T] == before[CHAT_T] and after[CHAT_B] == before[CHAT_B]
    assert after[STATS_T:RAW + 1] == before[STATS_T:RAW + 1]
    assert wait_idle(client)["active_generations"] == 0


def test_overlong_message_gets_a_clear_notice(server):
    from gradio_client.exceptions import AppError

    client = server.client()
    started = time.time()
    with pytest.raises(AppError) as err:
        client.predict(**chat_args("a" * 9000))
    assert "too long" in str(err.value) and "8192" in str(err.value)
    assert time.time() - started < 30
    with pytest.raises(AppError) as err:  # huge: refused before tokenizing
        client.predict(**chat_args("x" * 600_000))
    assert "too long" in str(err.value)
    # a normal message still works afterwards
    out = client.predict(**chat_args("ok", max_new_tokens=4))
    assert out[RAW]["ternary"]["stats"]["new_tokens"] >= 1


def test_stop_stops_the_decode_loop(server):
    client = server.client()
    job = client.submit(**chat_args("Tell me a long story", max_new_tokens=8000, temperature=0.8))
    deadline = time.time() + 30
    while time.time() < deadline:  # wait until the ternary answer streams
        outs = job.outputs()
        if outs and not is_skip(outs[-1][CHAT_T]) and text_of(outs[-1][CHAT_T][-1]):
            break
        time.sleep(0.05)
    else:
        pytest.fail("no streamed text within 30 s")
    t_stop = time.time()
    client.predict(api_name="/stop")
    final = job.result(timeout=20)
    assert time.time() - t_stop < 5, "generation did not stop promptly"
    raw = final[RAW]
    assert raw["ternary"]["finish_reason"] == "cancelled"
    assert raw["ternary"]["stats"]["new_tokens"] < 8000
    assert raw["int2"]["finish_reason"] == "cancelled"  # the baseline never started
    assert "stopped" in text_of(final[CHAT_B][-1])
    assert final[SUMMARY].startswith("Stopped") and "did not run" in final[SUMMARY]
    status = wait_idle(client)
    assert status["active_generations"] == 0
    assert not any(status["engine_active_generations"].values())


def test_cancelled_request_frees_the_engine(server):
    """Gradio's own cancel (closing the generator) also ends the engine's decode loop."""
    client = server.client()
    job = client.submit(**chat_args("Tell me a long story", max_new_tokens=8000, temperature=0.8))
    deadline = time.time() + 30
    while time.time() < deadline and not job.outputs():
        time.sleep(0.05)
    time.sleep(0.3)
    job.cancel()
    status = wait_idle(client, timeout=10)
    assert status["active_generations"] == 0
    assert not any(status["engine_active_generations"].values())
    # and the server serves the next request
    out = client.predict(**chat_args("ok", max_new_tokens=4))
    assert out[RAW]["ternary"]["finish_reason"] in ("stop", "length")


def test_openai_api_beside_the_page_shares_the_cpu(server):
    """app.py serves the OpenAI-compatible API (server/) on the same port; an API request that
    arrives while the page generates waits for the CPU instead of running alongside."""
    import importlib
    import json
    import threading
    import urllib.request

    importlib.import_module("server")  # the project's own package: a broken import fails, never skips
    base = server.url.rstrip("/")
    with urllib.request.urlopen(base + "/v1/models", timeout=30) as r:
        models = json.load(r)
    model_id = models["data"][0]["id"]
    assert model_id == "onnx"  # the exported folder's name

    def api_call(result):
        body = json.dumps({"model": model_id, "max_tokens": 4,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            result.update(json.load(r))

    client = server.client()
    job = client.submit(**chat_args("Tell me a long story", max_new_tokens=3000, temperature=0.8))
    deadline = time.time() + 30
    while time.time() < deadline:  # the ternary engine is streaming
        outs = job.outputs()
        if outs and text_of(outs[-1][CHAT_T][-1]):
            break
        time.sleep(0.05)
    result: dict = {}
    caller = threading.Thread(target=api_call, args=(result,))
    caller.start()
    final = job.result(timeout=120)
    caller.join(timeout=120)
    assert result["usage"]["completion_tokens"] >= 1
    # it waited for the page's ternary run (seconds), it did not share the cores with it
    assert result["bitnet"]["queue_wait_s"] > 0.3, result["bitnet"]
    assert final[RAW]["ternary"]["stats"]["new_tokens"] > 100
