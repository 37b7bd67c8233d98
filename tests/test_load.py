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
import random
import os
import statistics
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.api_support import free_port, tiny_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENTS = int(os.environ.get("BITNET_LOAD_CLIENTS", 16))
SECONDS = float(os.environ.get("BITNET_LOAD_SECONDS", 8))
MAX_TOKENS = int(os.environ.get("BITNET_LOAD_MAX_TOKENS", 24))
QUEUE_SIZE = 8
THINK_S = 0.3  # each client waits up to this long (uniform) between answer and next request
RSS_BOUND_MB = 40  # RSS after the run may exceed RSS after warm-up by at most this


@pytest.fixture(scope="module")
def server_process():
    folder = tiny_model_dir()
    port = free_port()
    env = dict(os.environ, BITNET_API_QUEUE_SIZE=str(QUEUE_SIZE), BITNET_API_QUEUE_TIMEOUT_S="20",
               BITNET_API_CONCURRENCY="1", OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    env.pop("BITNET_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "server", folder, "--name", "tiny", "--port", str(port),
                             "--threads", "1", "--page"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start: {proc.stdout.read()[-2000:]}")
        time.sleep(0.2)
    yield url, proc
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def one_request(client: httpx.AsyncClient, url: str, i: int, n: int) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"w{5 + i} w{n % 200} hello"}],
            "max_tokens": MAX_TOKENS, "temperature": 0.8, "seed": i * 1000 + n, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    rec = {"client": i, "n": n}
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        rec["status"] = r.status_code
        if r.status_code != 200:
            raw = await r.aread()
            rec["retry_after"] = r.headers.get("retry-after")
            try:
                rec["error"] = json.loads(raw)["error"]
            except Exception:
                rec["error"] = {"message": None, "raw": raw[:200].decode(errors="replace")}
            rec["latency_s"] = time.monotonic() - t0
            return rec
        text, done, usage, ttft = [], False, None, None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            obj = json.loads(data)
            if "error" in obj:
                rec["error"] = obj["error"]
                continue
            if obj.get("usage") and not obj.get("choices"):
                usage = obj["usage"]
            for ch in obj.get("choices", []):
                piece = ch["delta"].get("content")
                if piece:
                    if ttft is None:
                        ttft = time.monotonic() - t0
                    text.append(piece)
        rec.update(done=done, usage=usage, ttft_s=ttft, latency_s=time.monotonic() - t0, chars=len("".join(text)))
    return rec


async def run_load(url: str) -> tuple[list[dict], float]:
    deadline = time.monotonic() + SECONDS
    limits = httpx.Limits(max_connections=CLIENTS + 4, max_keepalive_connections=CLIENTS + 4)
    records = []

    async with httpx.AsyncClient(timeout=httpx.Timeout(60), limits=limits) as client:
        async def client_loop(i):
            rng = random.Random(i)
            n = 0
            while time.monotonic() < deadline:
                try:
                    rec = await one_request(client, url, i, n)
                except Exception as e:  # counted as an error below
                    rec = {"client": i, "n": n, "status": "exception", "error": {"message": repr(e)}}
                records.append(rec)
                n += 1
                if rec["status"] in (429, 503):
                    wait = float(rec.get("retry_after") or 1)
                else:  # a user reads the answer before asking again
                    wait = rng.uniform(0, THINK_S)
                await asyncio.sleep(max(0.0, min(wait, deadline - time.monotonic())))

        t0 = time.monotonic()
        await asyncio.gather(*(client_loop(i) for i in range(CLIENTS)))
        wall = time.monotonic() - t0
    return records, wall


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

    records, wall = asyncio.run(run_load(url))

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

    health = httpx.get(url + "/v1/health", timeout=10).json()
    time.sleep(0.5)
    rss_after = rss_mb(proc)
    health = httpx.get(url + "/v1/health", timeout=10).json()
    assert health["running"] == 0 and health["waiting"] == 0 and health["active_jobs"] == 0

    latencies = [r["latency_s"] for r in ok]
    ttfts = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    tokens = sum(r["usage"]["completion_tokens"] for r in ok)
    report = {
        "clients": CLIENTS, "seconds": SECONDS, "max_tokens": MAX_TOKENS, "queue_size": QUEUE_SIZE,
        "think_s": THINK_S, "requests": len(records), "clients_served": len(served), "completed": len(ok), "busy_429": sum(r["status"] == 429 for r in busy),
        "busy_503": sum(r["status"] == 503 for r in busy), "errors": len(other), "wall_s": round(wall, 2),
        "latency_p50_s": round(pct(latencies, 50), 4), "latency_p95_s": round(pct(latencies, 95), 4),
        "latency_max_s": round(max(latencies), 4),
        "ttft_p50_s": round(pct(ttfts, 50), 4) if ttfts else None,
        "ttft_p95_s": round(pct(ttfts, 95), 4) if ttfts else None,
        "completed_per_s": round(len(ok) / wall, 2), "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_after, 1),
        "rss_growth_mb": round(rss_after - rss_before, 1), "rss_bound_mb": RSS_BOUND_MB,
        "server_counters": health["counters"],
        "mean_latency_s": round(statistics.mean(latencies), 4),
    }
    path = os.environ.get("BITNET_LOAD_REPORT") or str(tmp_path / "load_report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print("\nload report (" + path + "):\n" + json.dumps(report, indent=2))
    assert rss_after - rss_before <= RSS_BOUND_MB, report
