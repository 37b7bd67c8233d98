"""Load: >= 16 concurrent streaming clients for a bounded time against the tiny model served by
`python -m server` (a separate process, with a Gradio page mounted) on 127.0.0.1.

Every request must complete (200, SSE ending in [DONE], usage counted) or get the busy answer
(429/503 with Retry-After and a JSON error); no other outcome. p50/p95 latency, time to first
token and throughput are printed and written to a JSON report (BITNET_LOAD_REPORT, else the
test's tmp folder); the server's RSS after the run must be within RSS_BOUND_MB of before.

Knobs: BITNET_LOAD_CLIENTS (16), BITNET_LOAD_SECONDS (8), BITNET_LOAD_MAX_TOKENS (24).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import psutil
import pytest

from bench.loadgen import run_load, summarize
from tests.api_support import server_subprocess, tiny_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENTS = int(os.environ.get("BITNET_LOAD_CLIENTS", 16))
SECONDS = float(os.environ.get("BITNET_LOAD_SECONDS", 8))
MAX_TOKENS = int(os.environ.get("BITNET_LOAD_MAX_TOKENS", 24))
QUEUE_SIZE = 8
THINK_S = 0.3  # each client waits up to this long (uniform) between answer and next request
RSS_BOUND_MB = 40  # RSS after the run may exceed RSS after warm-up by at most this


@pytest.fixture(scope="module")
def server_process():
    env = dict(BITNET_API_QUEUE_SIZE=str(QUEUE_SIZE), BITNET_API_QUEUE_TIMEOUT_S="20",
               BITNET_API_CONCURRENCY="1", OMP_NUM_THREADS="1")
    with server_subprocess([tiny_model_dir(), "--name", "tiny", "--threads", "1", "--page"], env, cwd=ROOT) \
            as (url, proc):
        yield url, proc


def rss_mb(proc) -> float:
    return psutil.Process(proc.pid).memory_info().rss / 2**20


def test_load_many_streaming_clients(server_process, tmp_path):
    url, proc = server_process
    # warm-up: a few requests, then the baseline memory
    for n in range(3):
        r = httpx.post(url + "/v1/chat/completions", timeout=30,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS})
        assert r.status_code == 200
    rss_before = rss_mb(proc)

    records, wall = asyncio.run(run_load(url, "tiny", CLIENTS, SECONDS, MAX_TOKENS, THINK_S))

    ok = [r for r in records if r["status"] == 200]
    busy = [r for r in records if r["status"] in (429, 503)]
    other = [r for r in records if r not in ok and r not in busy]
    assert not other, f"unexpected outcomes: {other[:5]}"
    bad_ok = [r for r in ok if not r.get("done") or r.get("error") or not r.get("usage")]
    assert not bad_ok, f"streams that did not finish cleanly: {bad_ok[:5]}"
    for r in busy:
        assert r.get("retry_after") and int(r["retry_after"]) >= 1, r
        assert isinstance(r["error"].get("message"), str) and r["error"]["message"], r
    assert len(ok) >= CLIENTS, f"only {len(ok)} requests completed"
    served = {r["client"] for r in ok}
    # not a fairness guarantee (429 means "come back later"), but nobody should starve entirely
    assert len(served) >= CLIENTS // 2, f"only {len(served)} of {CLIENTS} clients got an answer"

    time.sleep(0.5)
    rss_after = rss_mb(proc)
    health = httpx.get(url + "/v1/health", timeout=10).json()
    assert health["running"] == 0 and health["waiting"] == 0 and health["active_jobs"] == 0

    report = summarize(records, wall, clients=CLIENTS, seconds=SECONDS, max_tokens=MAX_TOKENS,
                       think_s=THINK_S, queue_size=QUEUE_SIZE)
    report.update(rss_before_mb=round(rss_before, 1), rss_after_mb=round(rss_after, 1),
                  rss_growth_mb=round(rss_after - rss_before, 1), rss_bound_mb=RSS_BOUND_MB,
                  server_counters=health["counters"])
    path = os.environ.get("BITNET_LOAD_REPORT") or str(tmp_path / "load_report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print("\nload report (" + path + "):\n" + json.dumps(report, indent=2))
    assert rss_after - rss_before <= RSS_BOUND_MB, report
