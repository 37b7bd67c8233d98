"""The playground launched for real (`python app.py` on a local port, tiny exported model),
driven with gradio_client through its stable API names (/chat, /retry, /stop, /clear, /status).
"""

from __future__ import annotations

import json
import time

import pytest

from playground.conversation import WAITING
from tests.test_app_common import AppServer, make_tiny_model

# /chat outputs, in order
MSG, CHAT_T, CHAT_B, STATS_T, STATS_B, SUMMARY, SPEED, TIMELINE, RAW, CONV = range(10)
SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("app-model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with AppServer(model_dir, tmp_path_factory.mktemp("app-run")) as srv:
        yield srv


@pytest.fixture(scope="module")
def server_one_at_a_time(model_dir, tmp_path_factory):
    """`python app.py --batch 0`: the old path, one generation at a time on the CPU."""
    with AppServer(model_dir, tmp_path_factory.mktemp("app-run-b0"), extra_args=["--batch", "0"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def engine(model_dir):
    """An engine in the test process, to count the tokens the app should report."""
    from runtime import Engine

    return Engine(model_dir, "ternary", threads=1)


def chat_args(message, conversation=(), baseline="int2", max_new_tokens=24, temperature=0.0,
              seed=7):
    conversation = conversation if isinstance(conversation, str) else json.dumps(list(conversation))
    return dict(message=message, conversation_=conversation, system_prompt=SYSTEM,
                baseline=baseline, max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=1.0, top_k=0, repetition_penalty=1.0, seed=seed, api_name="/chat")


def raw_of(outputs) -> dict:
    """The raw stats of a /chat answer (JSON text on the page)."""
    return json.loads(outputs[RAW])


def turns_of(outputs) -> list:
    """The conversation of a /chat answer (JSON text in a hidden box)."""
    return json.loads(outputs[CONV])


def is_skip(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update"


def text_of(message) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return content


def answer_of(message) -> str:
    """A pane's answer without its stats footer."""
    return text_of(message).split("\n\n<sub>")[0]


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
    assert status["fallback"] is False
    assert status["variants"] == ["ternary", "int2", "int4", "fp32"]
    assert status["baselines"] == ["int2", "int4", "fp32", "none"]
    assert status["loaded_engines"] == ["ternary", "int2"]  # default baseline preloaded


def test_chat_streams_both_panes_one_after_the_other(server, engine):
    client = server.client()
    job = client.submit(**chat_args("Hello there, how are you?", max_new_tokens=48))
    final = job.result(timeout=60)
    outputs = job.outputs()
    assert len(outputs) >= 3, "expected several streamed updates"
    # While the ternary engine answers, the baseline pane waits (never both at once).
    waiting = [o for o in outputs if answer_of(o[CHAT_T][-1]) and text_of(o[CHAT_B][-1]) == WAITING]
    assert waiting, "no update showed the ternary answer while the baseline waited"
    assert final[MSG] == "" or is_skip(final[MSG])

    raw = raw_of(final)
    assert set(raw["engines"]) == {"ternary", "int2"} and raw["seed"] == 7
    assert raw["hardware"]["threads"] == 1 and raw["hardware"]["cpu"]
    expected_prompt = len(engine.prompt_ids(messages=[{"role": "system", "content": SYSTEM},
                                                      {"role": "user", "content": "Hello there, how are you?"}]))
    for variant, pane in (("ternary", CHAT_T), ("int2", CHAT_B)):
        r = raw["engines"][variant]
        s = r["stats"]
        assert r["finish_reason"] in ("stop", "length")
        assert s["prompt_tokens"] == expected_prompt
        assert 1 <= s["new_tokens"] <= 48
        if r["finish_reason"] == "length":
            assert s["new_tokens"] == 48
        # byte-level tokenizer, printable bytes only: one generated token is one byte of text
        ended_by_stop_token = 1 if r["finish_reason"] == "stop" else 0
        assert len(r["text"].encode()) == s["new_tokens"] - ended_by_stop_token
        assert s["ttft_s"] > 0 and s["prefill_tokens_per_s"] > 0 and s["rss_mb"] > 0
        if s["new_tokens"] > 1:
            assert s["decode_tokens_per_s"] > 0
        assert s["variant"] == variant
        # cost per token: CPU time of this answer (the process's, shared by its batch) and weights
        assert 0 < s["cpu_s"] < 60 and s["cpu_ms_per_token"] == pytest.approx(
            s["cpu_s"] * 1000 / s["new_tokens"])
        assert s["weights_mb_per_token"] > 0
        if variant == "ternary":  # every decode step reads the weights once, for its whole batch
            assert s["weights_mb_per_token"] == pytest.approx(
                engine.model_file_bytes / 2**20 / max(1.0, s.get("batch_size") or 1.0))
        pane_msgs = final[pane]
        assert [m["role"] for m in pane_msgs] == ["user", "assistant"]
        assert text_of(pane_msgs[0]) == "Hello there, how are you?"
        assert answer_of(pane_msgs[1]) == r["text"] or not r["text"]
        assert f"seed 7" in text_of(pane_msgs[1])  # stats kept with each message
    # greedy: the baseline computes the same function, so it writes the same text
    assert raw["engines"]["ternary"]["text"] == raw["engines"]["int2"]["text"]
    assert "TTFT" in final[STATS_T] and "decode" in final[STATS_T] and "weights" in final[STATS_T]
    assert "ms/token" in final[STATS_T] and "CPU time" in final[STATS_B]
    assert "context" in final[STATS_T]
    assert "int2" in final[STATS_B] and "TTFT" in final[STATS_B]
    assert "Speed-up" in final[SUMMARY] and "memory" in final[SUMMARY]
    speed = {row[0]: row[1] for row in final[SPEED]["data"]}
    assert set(speed) == {"ternary", "int2"} and all(v >= 0 for v in speed.values())
    engines_in_timeline = {row[2] for row in final[TIMELINE]["data"]}
    assert engines_in_timeline == {"ternary", "int2"}
    last_t = [row for row in final[TIMELINE]["data"] if row[2] == "ternary"][-1]
    assert last_t[1] == raw["engines"]["ternary"]["stats"]["new_tokens"]


def test_one_conversation_both_engines_same_prompt(server, engine):
    """Issue 11.2: sampled answers differ, yet each turn both engines get the same prompt, the
    ternary answers as history; the baseline pane keeps the baseline's own answers."""
    client = server.client()
    first_msg = "<script>alert(1)</script> & hi"
    first = client.predict(**chat_args(first_msg, max_new_tokens=30, temperature=1.0, seed=11))
    conv = first[CONV]
    # the pane gets the text as typed (the page renders its markdown and sanitizes the HTML:
    # tests/test_app_browser.py)
    assert text_of(first[CHAT_T][0]) == first_msg
    t1, b1 = (raw_of(first)["engines"][v]["text"] for v in ("ternary", "int2"))
    second = client.predict(**chat_args("And then?", conv, baseline="int4", max_new_tokens=30,
                                        temperature=1.0, seed=12))
    expected = engine.prompt_ids(messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": first_msg},
        {"role": "assistant", "content": t1}, {"role": "user", "content": "And then?"}])
    raw = raw_of(second)["engines"]
    assert raw["ternary"]["stats"]["prompt_tokens"] == len(expected)
    assert raw["int4"]["stats"]["prompt_tokens"] == len(expected)  # token for token
    assert [m["role"] for m in second[CHAT_T]] == ["user", "assistant"] * 2
    assert [m["role"] for m in second[CHAT_B]] == ["user", "assistant"] * 2
    # each pane shows its own engine's answers, turn by turn
    assert answer_of(second[CHAT_T][1]) == t1 and answer_of(second[CHAT_B][1]) == b1
    assert answer_of(second[CHAT_B][3]) == raw["int4"]["text"]
    assert "int2" in text_of(second[CHAT_B][1]) and "int4" in text_of(second[CHAT_B][3])

    # no baseline for a turn: its pane says so, and the next baseline run still sees one history
    third = client.predict(**chat_args("Third", second[CONV], baseline="none", max_new_tokens=8))
    assert "no baseline" in text_of(third[CHAT_B][-1])
    assert "none selected" in third[SUMMARY] or "no baseline" in third[SUMMARY]
    fourth = client.predict(**chat_args("Fourth", third[CONV], baseline="int2", max_new_tokens=8))
    raw = raw_of(fourth)["engines"]
    assert raw["ternary"]["stats"]["prompt_tokens"] == raw["int2"]["stats"]["prompt_tokens"]

    # retry answers the last message again, replacing (not adding) the turn; greedy = same text
    g = client.predict(**chat_args("Greedy", fourth[CONV], max_new_tokens=8))
    retried = client.predict(conversation_=g[CONV], system_prompt=SYSTEM, baseline="int2",
                             max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0,
                             repetition_penalty=1.0, seed=7, api_name="/retry")
    assert len(turns_of(retried)) == len(turns_of(g)) == 5 and turns_of(retried)[-1]["user"] == "Greedy"
    assert raw_of(retried)["engines"]["ternary"]["text"] == raw_of(g)["engines"]["ternary"]["text"]

    # edit: the last message goes back to the box, its turn leaves the conversation
    edited = client.predict(conversation_=retried[CONV], api_name="/edit")
    assert edited[MSG] == "Greedy" and len(turns_of(edited)) == 4

    cleared = client.predict(api_name="/clear")
    assert cleared[0] == [] and cleared[1] == [] and cleared[-1] == "[]"


def test_seed_is_fresh_per_answer_unless_set(server):
    client = server.client()
    a = client.predict(**chat_args("Pick", max_new_tokens=16, temperature=1.0, seed=-1))
    b = client.predict(**chat_args("Pick", max_new_tokens=16, temperature=1.0, seed=-1))
    assert raw_of(a)["seed"] != raw_of(b)["seed"]
    assert f"seed {raw_of(a)['seed']}" in text_of(a[CHAT_T][-1])
    # the seed shown reproduces the answer
    again = client.predict(**chat_args("Pick", max_new_tokens=16, temperature=1.0, seed=raw_of(a)["seed"]))
    assert raw_of(again)["engines"]["ternary"]["text"] == raw_of(a)["engines"]["ternary"]["text"]


def test_baseline_choice_and_none(server):
    client = server.client()
    out = client.predict(**chat_args("Compare with fp32", baseline="fp32", max_new_tokens=6))
    assert set(raw_of(out)["engines"]) == {"ternary", "fp32"}
    assert raw_of(out)["engines"]["fp32"]["text"] == raw_of(out)["engines"]["ternary"]["text"]
    assert "too short to compare" in out[SUMMARY]  # 5 decoded tokens: no headline ratio
    status = client.predict(api_name="/status")
    assert status["loaded_engines"] == ["ternary", "fp32"]  # at most one baseline kept
    out = client.predict(**chat_args("No baseline now", baseline="none", max_new_tokens=6))
    assert set(raw_of(out)["engines"]) == {"ternary"}
    assert "no baseline" in text_of(out[CHAT_B][-1])
    assert "none (ternary only)" in out[STATS_B]
    assert "no baseline" in out[SUMMARY]


def test_empty_message_does_nothing(server):
    client = server.client()
    for message in ("", "   ", "\n\t"):
        out = client.predict(**chat_args(message))
        assert out[CHAT_T] == [] and out[CHAT_B] == [] and turns_of(out) == []
    # after a conversation: the page stays exactly as it was
    before = client.predict(**chat_args("Hi", max_new_tokens=4))
    after = client.predict(**chat_args("  ", before[CONV]))
    assert after[CHAT_T] == before[CHAT_T] and after[CHAT_B] == before[CHAT_B]
    assert after[STATS_T:RAW + 1] == before[STATS_T:RAW + 1] and after[CONV] == before[CONV]
    assert wait_idle(client)["active_generations"] == 0


def test_overlong_message_keeps_the_chat_and_logs_one_line(server):
    """Issue 11.8: a visitor's error is a notice; the chats and the message stay, one log line."""
    client = server.client()
    before = client.predict(**chat_args("ok", max_new_tokens=4))
    started = time.time()
    out = client.predict(**chat_args("a" * 9000, before[CONV]))
    assert "too long" in out[SUMMARY] and "8192" in out[SUMMARY]
    assert out[MSG] == "a" * 9000  # kept, to shorten it
    assert out[CHAT_T] == before[CHAT_T] and out[CONV] == before[CONV]
    assert time.time() - started < 30
    out = client.predict(**chat_args("x" * 600_000, before[CONV]))  # huge: refused before tokenizing
    assert "too long" in out[SUMMARY]
    log = server.log_text()
    assert "Traceback" not in log
    assert sum("refused (Message too long)" in line for line in log.splitlines()) == 2
    # a normal message still works afterwards
    out = client.predict(**chat_args("ok", max_new_tokens=4))
    assert raw_of(out)["engines"]["ternary"]["stats"]["new_tokens"] >= 1


def wait_streaming(job, pane=CHAT_T, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:  # wait until the answer streams
        outs = job.outputs()
        if outs and not is_skip(outs[-1][pane]) and outs[-1][pane] and answer_of(outs[-1][pane][-1]):
            return
        time.sleep(0.05)
    pytest.fail(f"no streamed text within {timeout} s")


def test_stop_stops_the_decode_loop(server):
    client = server.client()
    job = client.submit(**chat_args("Tell me a long story", max_new_tokens=8000, temperature=0.8))
    wait_streaming(job)
    t_stop = time.time()
    client.predict(api_name="/stop")
    final = job.result(timeout=20)
    assert time.time() - t_stop < 5, "generation did not stop promptly"
    raw = raw_of(final)["engines"]
    assert raw["ternary"]["finish_reason"] == "cancelled"
    assert raw["ternary"]["stats"]["new_tokens"] < 8000
    assert raw["int2"]["finish_reason"] == "cancelled"  # the baseline never started
    assert "not run" in text_of(final[CHAT_B][-1])
    assert final[SUMMARY].startswith("Stopped") and "did not run" in final[SUMMARY]
    status = wait_idle(client)
    assert status["active_generations"] == 0
    assert not any(status["engine_active_generations"].values())


def test_stop_withdraws_a_queued_turn_at_once(server_one_at_a_time):
    """Issue 11.6: a page turn waiting for the CPU (an API request holds it) leaves at once on
    Stop; it never runs later."""
    import threading
    import urllib.request

    server = server_one_at_a_time  # one slot: the page's turn queues behind the API request
    base = server.url.rstrip("/")
    done = {}

    def api_call():
        body = json.dumps({"model": "any", "max_tokens": 6000, "temperature": 0.8,
                           "messages": [{"role": "user", "content": "long"}]}).encode()
        req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            done.update(json.load(r))

    caller = threading.Thread(target=api_call)
    caller.start()
    client = server.client()
    deadline = time.time() + 20
    while client.predict(api_name="/status")["gate"]["running"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    job = client.submit(**chat_args("Queued turn", max_new_tokens=50))
    deadline = time.time() + 20
    while client.predict(api_name="/status")["gate"]["waiting"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    assert client.predict(api_name="/status")["gate"]["waiting"] == 1, "the turn did not queue"
    t_stop = time.time()
    client.predict(api_name="/stop")
    final = job.result(timeout=20)
    assert time.time() - t_stop < 2, "Stop did not withdraw the queued turn at once"
    assert caller.is_alive(), "the API request should still be running"
    raw = raw_of(final)["engines"]
    assert raw["ternary"]["stats"] is None and raw["ternary"]["finish_reason"] == "cancelled"
    assert "not run" in text_of(final[CHAT_T][-1])
    caller.join(120)
    assert done["usage"]["completion_tokens"] >= 1
    assert wait_idle(client)["gate"]["waiting"] == 0


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
    assert raw_of(out)["engines"]["ternary"]["finish_reason"] in ("stop", "length")


def test_openai_api_beside_the_page_shares_the_cpu(server_one_at_a_time):
    """With --batch 0, app.py serves the OpenAI-compatible API (server/) on the same port; an
    API request that arrives while the page generates waits for the CPU instead of running
    alongside."""
    _page_turn_then_api_call(server_one_at_a_time, batched=False)


def test_openai_api_and_the_page_share_the_ternary_batch(server):
    """By default the page's ternary engine is the API's BatchedEngine: an API request that
    arrives while the page's ternary answer streams joins its decode steps (batch 2, no wait
    for the whole answer), and both report the batch they ran in; the page shows "batch N"."""
    status = server.client().predict(api_name="/status")
    assert status["batch"] == 4 and status["gate"]["concurrency"] == 4, status
    _page_turn_then_api_call(server, batched=True)


def _page_turn_then_api_call(server, batched: bool):
    import threading
    import urllib.request

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
    wait_streaming(job)
    result: dict = {}
    caller = threading.Thread(target=api_call, args=(result,))
    caller.start()
    final = job.result(timeout=120)
    caller.join(timeout=120)
    assert result["usage"]["completion_tokens"] >= 1
    ternary = raw_of(final)["engines"]["ternary"]["stats"]
    assert ternary["new_tokens"] > 100
    if not batched:
        # it waited for the page's ternary run (seconds), it did not share the cores with it
        assert result["bitnet"]["queue_wait_s"] > 0.3, result["bitnet"]
        assert "max_batch_size" not in ternary
        return
    # it ran in the page's batch: no wait for the page's answer, two streams per step
    assert result["bitnet"]["max_batch_size"] == 2, result["bitnet"]
    assert result["bitnet"]["queue_wait_s"] < 0.3, result["bitnet"]
    assert ternary["max_batch_size"] == 2 and 1 <= ternary["batch_size"] < 2, ternary
    assert "batch **2**" in final[STATS_T]
    # the baseline is a plain engine, after the ternary answer: no batch stats
    assert "max_batch_size" not in raw_of(final)["engines"]["int2"]["stats"]


def test_start_up_prints_urls_and_the_apps_share_flag(server):
    log = server.log_text()
    assert f"page at {server.url}" in log and f"API at {server.url.rstrip('/')}/v1" in log
    assert "run again with --share" in log
    assert "share=True" not in log  # Gradio's own advice names a flag the app does not have


def test_frequency_and_presence_penalties_reach_the_engines(server, engine):
    from runtime import GenerationSettings

    client = server.client()
    out = client.predict(**chat_args("Hello there", max_new_tokens=40), frequency_penalty=1.5,
                         presence_penalty=0.5)
    assert turns_of(out)[-1]["settings"]["frequency_penalty"] == 1.5
    assert turns_of(out)[-1]["settings"]["presence_penalty"] == 0.5
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there"}]

    def greedy(**penalties):
        return engine.generate(messages=messages, settings=GenerationSettings(
            max_new_tokens=40, temperature=0.0, truncate=True, **penalties)).text

    penalized = greedy(frequency_penalty=1.5, presence_penalty=0.5)
    assert penalized != greedy()  # the penalties change this answer ...
    for variant in ("ternary", "int2"):  # ... and both engines got them
        assert raw_of(out)["engines"][variant]["text"] == penalized
