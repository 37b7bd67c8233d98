"""Faults the server must survive: clients that disconnect mid-stream or while queued, clients
that time out, generations that run too long, bodies that never arrive, and an export killed
midway (SIGKILL) that must leave nothing loadable and let the next export succeed."""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from runtime import Engine, EngineError, GenerationSettings
from server import Limits, create_api
from tests.api_support import ServerThread, SlowEngine, tiny_model_dir, wait_until

MODEL = "tiny"
PROMPT = [{"role": "user", "content": "hello there"}]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model_dir(), variant="ternary", threads=1)


@pytest.fixture()
def slow_server(engine):
    """A server whose engine hands on one token every 20 ms (the work is real; only slowed)."""
    slow = SlowEngine(engine, delay_s=0.02)
    api = create_api({MODEL: slow}, limits=Limits(concurrency=1, queue_size=4), api_key=None)
    with ServerThread(api) as url:
        yield url, api.state.bitnet, slow


def body(**kw):
    b = {"model": MODEL, "messages": PROMPT, "max_tokens": 100, "temperature": 0}
    b.update(kw)
    return b


def read_stream(url, b, results, key):
    def run():
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=b, timeout=60) as r:
                results[key] = (r.status_code, r.read().decode())
        except Exception as e:
            results[key] = ("exception", repr(e))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def stream_text(sse: str) -> str:
    import json

    out = []
    for line in sse.splitlines():
        if line.startswith("data: {"):
            obj = json.loads(line[6:])
            if obj.get("choices"):
                out.append(obj["choices"][0]["delta"].get("content") or "")
    return "".join(out)


def test_disconnect_mid_stream_stops_the_generation(slow_server, engine):
    url, state, slow = slow_server
    expected_b = engine.generate(messages=PROMPT, settings=GenerationSettings(max_new_tokens=30)).text
    results = {}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", url + "/v1/chat/completions", json=body(stream=True)) as r:
            assert r.status_code == 200
            # a second client queues behind the first
            t_b = read_stream(url, body(stream=True, max_tokens=30), results, "b")
            assert wait_until(lambda: state.gate.waiting == 1)
            seen = 0
            for line in r.iter_lines():
                if '"content": "w' in line or '"content": " w' in line:
                    seen += 1
                if seen == 3:
                    break
        # leaving the block closes the connection mid-stream
    t_disconnect = time.monotonic()
    rec_a = next(rec for rec in state.records() if rec.model == MODEL)
    assert wait_until(lambda: rec_a.state == "done", timeout=5)
    stop_latency = time.monotonic() - t_disconnect
    assert rec_a.stopped_by == "client" and rec_a.finish_reason == "cancelled"
    assert rec_a.new_tokens < 100
    assert rec_a.tokens_after_cancel is not None and rec_a.tokens_after_cancel <= 1  # one decode step
    assert 0 <= slow.steps_after_cancel[0] <= 1
    # the other client is unaffected: complete and correct
    t_b.join(30)
    status, text = results["b"]
    assert status == 200 and text.rstrip().endswith("data: [DONE]")
    assert stream_text(text) == expected_b
    assert wait_until(state.engine_idle, timeout=5) and engine.active_generations == 0
    print(f"generation stopped {stop_latency * 1000:.0f} ms after the disconnect, "
          f"{rec_a.tokens_after_cancel} token(s) after the cancel flag")


def test_disconnect_while_queued_never_starts(slow_server):
    url, state, slow = slow_server
    results = {}
    t_a = read_stream(url, body(stream=True, max_tokens=40), results, "a")
    assert wait_until(lambda: state.gate.counters["started"] == 1)
    started_before = 1

    def queued_then_gone():
        with httpx.Client(timeout=httpx.Timeout(30, read=0.3)) as c:
            with pytest.raises(httpx.ReadTimeout):
                c.post(url + "/v1/chat/completions", json=body(max_tokens=40))
    queued_then_gone()
    assert wait_until(lambda: state.gate.waiting == 0, timeout=3)  # its place was given up
    t_a.join(30)
    assert results["a"][0] == 200
    assert wait_until(state.engine_idle)
    assert state.gate.counters["started"] == started_before  # the queued one never ran
    gone = [r for r in state.records() if r.state == "abandoned"]
    assert gone and gone[-1].stopped_by == "client"


def test_non_streaming_client_timeout_cancels(slow_server):
    url, state, slow = slow_server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body(max_tokens=100), timeout=httpx.Timeout(10, read=0.4))
    assert wait_until(state.engine_idle, timeout=3)
    rec = state.records()[-1]
    assert rec.stopped_by == "client" and rec.finish_reason == "cancelled" and rec.new_tokens < 100
    assert rec.tokens_after_cancel <= 1


def test_generation_timeout_ends_the_answer_cleanly(engine):
    slow = SlowEngine(engine, delay_s=0.02)
    api = create_api({MODEL: slow}, limits=Limits(generation_timeout_s=0.3), api_key=None)
    state = api.state.bitnet
    with ServerThread(api) as url:
        r = httpx.post(url + "/v1/chat/completions", json=body(max_tokens=100), timeout=30)
        assert r.status_code == 200
        out = r.json()
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["bitnet"]["stopped_by"] == "timeout"
        assert 1 <= out["usage"]["completion_tokens"] < 100
        with httpx.stream("POST", url + "/v1/chat/completions", json=body(stream=True), timeout=30) as s:
            text = s.read().decode()
        assert text.rstrip().endswith("data: [DONE]") and '"stopped_by": "timeout"' in text
        assert wait_until(state.engine_idle)


def test_body_that_never_arrives_gets_408(engine):
    api = create_api({MODEL: engine}, limits=Limits(body_timeout_s=0.5), api_key=None)
    with ServerThread(api) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 500\r\n\r\n{\"model\": ")
            t0 = time.monotonic()
            reply = b""
            while b"body_timeout" not in reply and time.monotonic() - t0 < 5:
                data = s.recv(4096)
                if not data:
                    break
                reply += data
            reply = reply.decode()
            assert time.monotonic() - t0 < 5
        assert reply.startswith("HTTP/1.1 408") and "body_timeout" in reply
        # the server is fine afterwards
        assert httpx.post(url + "/v1/chat/completions", json=body(max_tokens=2), timeout=30).status_code == 200
        assert api.state.bitnet.gate.counters["admitted"] == 1


def test_engine_error_is_a_json_error_not_a_crash(engine):
    class Broken(SlowEngine):
        def stream(self, **kw):
            yield from []
            raise RuntimeError("the engine broke")

    api = create_api({MODEL: Broken(engine)}, limits=Limits(), api_key=None)
    with ServerThread(api) as url:
        r = httpx.post(url + "/v1/chat/completions", json=body(max_tokens=2), timeout=30)
        assert r.status_code == 500 and "the engine broke" in r.json()["error"]["message"]
        with httpx.stream("POST", url + "/v1/chat/completions", json=body(stream=True), timeout=30) as s:
            text = s.read().decode()
        assert '"error"' in text and "the engine broke" in text and text.rstrip().endswith("data: [DONE]")
        assert wait_until(api.state.bitnet.engine_idle)


def test_models_still_loading_gets_503(engine):
    ready = {}
    api = create_api(lambda: ready.get("models"), limits=Limits(), api_key=None)
    with ServerThread(api) as url:
        r = httpx.post(url + "/v1/chat/completions", json=body(max_tokens=2), timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and r.headers["retry-after"]
        assert httpx.get(url + "/v1/health", timeout=10).json()["status"] == "loading"
        ready["models"] = {MODEL: engine}
        assert httpx.post(url + "/v1/chat/completions", json=body(max_tokens=2), timeout=30).status_code == 200
        # a model whose loader fails: 503 with the reason, retried on the next request
        ready["models"] = {MODEL: engine, "broken": lambda: Engine(tiny_model_dir(), variant="fp32")}
        r = httpx.post(url + "/v1/chat/completions", json=body(model="broken", max_tokens=2), timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
        assert "fp32" in r.json()["error"]["message"]


# -- the exporter killed midway ------------------------------------------------------------
def test_export_killed_midway_leaves_nothing_loadable(tmp_path):
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from tests.checkpoints import write_tiny_checkpoint

    # big enough that the export takes a while after its first progress line
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", seed=3, tied=False, num_hidden_layers=6,
                                 hidden_size=256, intermediate_size=704, num_attention_heads=4,
                                 num_key_value_heads=2)
    out = tmp_path / "models" / "tiny"
    cmd = [sys.executable, "-m", "export", str(ckpt), "--out", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stderr:  # progress lines: "layer 1/6 done ..."
            if line.startswith("layer 1/"):
                partial = glob.glob(str(out.parent / ".tiny.partial-*"))
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the export finished before it could be killed"
    assert partial, "no partial folder was being written when killed"
    # nothing that looks complete: the target folder does not exist, the engine refuses it
    assert not out.exists()
    with pytest.raises(EngineError):
        Engine(str(out))
    # the next export (as the app's next start would run) succeeds and cleans up the leftovers
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not glob.glob(str(out.parent / ".tiny.partial-*"))
    eng = Engine(str(out), variant="ternary", threads=1)
    result = eng.generate(messages=PROMPT, settings=GenerationSettings(max_new_tokens=4))
    assert result.stats.new_tokens >= 1
