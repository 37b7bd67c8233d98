"""The OpenAI API served through the batcher (runtime.batcher.BatchedEngine in the model
registry, the gate's concurrency = the batcher's slots), on 127.0.0.1 with the tiny model:

- answers equal the plain engine's (greedy), streaming or not;
- 16 streaming clients for a few seconds: zero errors, no broken stream, and the streams did
  share decode steps (tokens per step > 1);
- a client that disconnects mid-stream frees its slot within a step;
- `python -m server DIR` batches by default (4 slots), `--batch 0` keeps the one-at-a-time path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time

import httpx
import pytest

from bench.loadgen import run_load, summarize
from runtime import Engine, GenerationSettings
from runtime.batcher import BatchedEngine
from server import Limits, create_api
from tests.api_support import ServerThread, tiny_model_dir, wait_until

MODEL = "tiny"
SLOTS = 8
PROMPT = [{"role": "user", "content": "hello there"}]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def plain():
    return Engine(tiny_model_dir(), variant="ternary", threads=1)


@pytest.fixture(scope="module")
def served():
    batched = BatchedEngine(Engine(tiny_model_dir(), variant="ternary", threads=1), slots=SLOTS)
    api = create_api({MODEL: batched}, limits=Limits(concurrency=SLOTS, queue_size=8, default_max_tokens=16),
                     api_key=None)
    with ServerThread(api) as url:
        yield url, batched, api.state.bitnet
    batched.close()


def _post(url, **body):
    return httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": PROMPT, **body}, timeout=30)


def test_answers_equal_the_plain_engine(served, plain):
    url, _, _ = served
    expected = plain.generate(messages=PROMPT, settings=GenerationSettings(max_new_tokens=12)).text
    r = _post(url, max_tokens=12, temperature=0)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected
    pieces = []
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=30,
                      json={"model": MODEL, "messages": PROMPT, "max_tokens": 12, "temperature": 0,
                            "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:]).get("choices", []):
                    pieces.append(choice["delta"].get("content") or "")
    assert "".join(pieces) == expected


def test_sixteen_streaming_clients_share_the_steps(served):
    url, batched, state = served
    steps0 = batched.batcher.steps
    records, wall = asyncio.run(run_load(url, MODEL, clients=16, seconds=4, max_tokens=24, think_s=0.2))
    report = summarize(records, wall)
    assert report["errors"] == 0 and report["broken_streams"] == 0, report
    assert report["completed"] >= 16, report
    tokens_per_step = report["completion_tokens"] / max(1, batched.batcher.steps - steps0)
    assert tokens_per_step > 1.5, report  # streams were decoded together
    assert wait_until(lambda: batched.batcher.stats()["running"] == 0, 5)
    assert batched.batcher.stats()["free_slots"] == SLOTS


def test_a_disconnect_frees_the_slot(served, monkeypatch):
    """The client leaves after its first chunk of a 100-token answer (steps slowed to 20 ms):
    the job stops as "client", the stream ends "cancelled" within a step or two, the slot is free."""
    url, batched, state = served
    decode = batched.batcher.pool.decode
    monkeypatch.setattr(batched.batcher.pool, "decode", lambda tokens: (time.sleep(0.02), decode(tokens))[1])
    before = set(state.jobs)
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=30,
                      json={"model": MODEL, "messages": PROMPT, "max_tokens": 100, "stream": True,
                            "temperature": 0}) as s:
        # Hold the line iterator: breaking out of `for line in s.iter_lines()` drops the last
        # reference to httpx's generator, CPython closes it at once, and that closes the
        # half-read response and its connection: a real disconnect, which the server (rightly)
        # marks "client" right after the first token. That was the "flaky" live request.
        lines = s.iter_lines()
        for line in lines:  # up to the first generated text
            if line.startswith("data: {") and any(c["delta"].get("content")
                                                  for c in json.loads(line[6:]).get("choices", [])):
                break
        time.sleep(0.1)
        (job_id,) = set(state.jobs) - before
        job = state.jobs[job_id]
        # still connected: the stream runs on in the batch
        assert job.record.stopped_by is None and not job.finished.is_set(), job.record
        assert batched.batcher.stats()["running"] == 1
    # leaving the block closes the connection mid-stream: the disconnect
    assert wait_until(lambda: batched.batcher.stats()["running"] == 0, 5)
    assert batched.batcher.stats()["free_slots"] == SLOTS
    assert wait_until(job.finished.is_set, 5)
    assert job.record.stopped_by == "client" and job.record.finish_reason == "cancelled", job.record
    assert job.record.new_tokens < 50 and job.record.tokens_after_cancel <= 2, job.record


def test_python_m_server_batch_under_sixteen_clients(tmp_path):
    """`python -m server DIR --batch 8` (its own process, page mounted): 16 streaming clients
    for a few seconds get zero errors and no broken stream; concurrent answers report that
    they ran in a batch (bitnet.max_batch_size > 1) and equal the plain engine's."""
    import concurrent.futures

    from tests.api_support import server_subprocess

    folder = tiny_model_dir()
    env = {"BITNET_API_QUEUE_SIZE": "8", "BITNET_API_QUEUE_TIMEOUT_S": "20", "OMP_NUM_THREADS": "1"}
    with server_subprocess([folder, "--name", MODEL, "--threads", "1", "--page", "--batch", "8"],
                           env_overrides=env, cwd=ROOT) as (url, _proc):
        assert httpx.get(url + "/v1/health", timeout=5).json()["concurrency"] == 8

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: _post(url, max_tokens=40, temperature=0).json(), range(6)))
        expected = Engine(folder, variant="ternary", threads=1).generate(
            messages=PROMPT, settings=GenerationSettings(max_new_tokens=40)).text
        assert all(a["choices"][0]["message"]["content"] == expected for a in answers), answers[0]
        assert max(a["bitnet"]["max_batch_size"] for a in answers) > 1, [a["bitnet"] for a in answers]

        records, wall = asyncio.run(run_load(url, MODEL, clients=16, seconds=4, max_tokens=24, think_s=0.2))
        report = summarize(records, wall)
        assert report["errors"] == 0 and report["broken_streams"] == 0, report
        assert report["completed"] >= 16, report
        assert wait_until(lambda: httpx.get(url + "/v1/health", timeout=5).json()["running"] == 0, 10)


@contextlib.contextmanager
def _server_process(*args):
    """`python -m server TINY --name tiny ...args` on a free loopback port; yields its URL."""
    from tests.api_support import server_subprocess

    with server_subprocess([tiny_model_dir(), "--name", MODEL, "--threads", "1", *args],
                           env_overrides={"OMP_NUM_THREADS": "1"}, cwd=ROOT) as (url, _proc):
        yield url


@pytest.mark.parametrize("flags, slots", [((), 4), (("--batch", "0"), 0)], ids=["default", "batch-0"])
def test_python_m_server_batches_by_default(flags, slots, plain):
    """No flag: the API runs through a 4-slot batcher (concurrency 4, concurrent answers ran in a
    batch > 1 and equal the plain engine's). `--batch 0`: the plain engine, one at a time (concurrency
    1, no batch stats), the same answers."""
    import concurrent.futures

    expected = plain.generate(messages=PROMPT, settings=GenerationSettings(max_new_tokens=40)).text
    with _server_process(*flags) as url:
        assert httpx.get(url + "/v1/health", timeout=5).json()["concurrency"] == max(slots, 1)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: _post(url, max_tokens=40, temperature=0).json(), range(4)))
    assert all(a["choices"][0]["message"]["content"] == expected for a in answers), answers[0]
    if slots:
        assert max(a["bitnet"]["max_batch_size"] for a in answers) > 1, [a["bitnet"] for a in answers]
        assert all(a["bitnet"]["max_batch_size"] <= slots for a in answers)
    else:
        assert all("max_batch_size" not in a["bitnet"] for a in answers), answers[0]["bitnet"]
