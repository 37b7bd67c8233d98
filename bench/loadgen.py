"""A small load generator for the API: N concurrent streaming clients for T seconds.

    python -m bench.loadgen http://127.0.0.1:8000 --model tiny --clients 16 --seconds 8

Each client sends streaming chat completions one after another (waiting 0..think seconds
after an answer, and Retry-After seconds after a busy answer) until the time is up; in-flight
requests are allowed to finish. Prints one JSON report: outcomes (completed / 429 / 503 /
errors), p50/p95 latency and time to first token, throughput. Use it only against servers you
run (it is a load test).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def one_request(client, url: str, model: str, i: int, n: int, max_tokens: int, api_key=None) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": f"w{5 + i} w{n % 200} hello"}],
            "max_tokens": max_tokens, "temperature": 0.8, "seed": i * 1000 + n, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    t0 = time.monotonic()
    rec = {"client": i, "n": n}
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
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
        done, usage, ttft, chars = False, None, None, 0
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
            if obj.get("bitnet"):
                rec["queue_wait_s"] = obj["bitnet"].get("queue_wait_s")
                rec["engine_s"] = obj["bitnet"].get("total_s")
            for ch in obj.get("choices", []):
                piece = ch["delta"].get("content")
                if piece:
                    if ttft is None:
                        ttft = time.monotonic() - t0
                    chars += len(piece)
        rec.update(done=done, usage=usage, ttft_s=ttft, latency_s=time.monotonic() - t0, chars=chars)
    return rec


async def run_load(url: str, model: str, clients: int = 16, seconds: float = 8.0, max_tokens: int = 24,
                   think_s: float = 0.3, api_key=None, timeout_s: float = 300.0):
    """(records, wall seconds)."""
    import httpx

    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    records = []

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        async def client_loop(i):
            rng = random.Random(i)
            n = 0
            while time.monotonic() < deadline:
                try:
                    rec = await one_request(client, url, model, i, n, max_tokens, api_key)
                except Exception as e:  # counted as an error
                    rec = {"client": i, "n": n, "status": "exception", "error": {"message": repr(e)}}
                records.append(rec)
                n += 1
                if rec["status"] in (429, 503):
                    wait = float(rec.get("retry_after") or 1)
                else:  # a user reads the answer before asking again
                    wait = rng.uniform(0, think_s)
                await asyncio.sleep(max(0.0, min(wait, deadline - time.monotonic())))

        t0 = time.monotonic()
        await asyncio.gather(*(client_loop(i) for i in range(clients)))
        wall = time.monotonic() - t0
    return records, wall


def summarize(records, wall: float, **settings) -> dict:
    ok = [r for r in records if r["status"] == 200]
    busy = [r for r in records if r["status"] in (429, 503)]
    errors = [r for r in records if r not in ok and r not in busy]
    broken = [r for r in ok if not r.get("done") or r.get("error") or not r.get("usage")]
    latencies = [r["latency_s"] for r in ok]
    ttfts = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    tokens = sum(r["usage"]["completion_tokens"] for r in ok if r.get("usage"))
    queue = [r["queue_wait_s"] for r in ok if r.get("queue_wait_s") is not None]
    engine = [r["engine_s"] for r in ok if r.get("engine_s") is not None]

    def rnd(x, d=4):
        return None if x is None else round(x, d)

    return {**settings, "requests": len(records), "completed": len(ok),
            "clients_served": len({r["client"] for r in ok}),
            "busy_429": sum(r["status"] == 429 for r in busy), "busy_503": sum(r["status"] == 503 for r in busy),
            "errors": len(errors), "broken_streams": len(broken), "wall_s": round(wall, 2),
            "latency_p50_s": rnd(pct(latencies, 50)), "latency_p95_s": rnd(pct(latencies, 95)),
            "latency_max_s": rnd(max(latencies) if latencies else None),
            "ttft_p50_s": rnd(pct(ttfts, 50)), "ttft_p95_s": rnd(pct(ttfts, 95)),
            "queue_wait_p50_s": rnd(pct(queue, 50)), "queue_wait_p95_s": rnd(pct(queue, 95)),
            "engine_p50_s": rnd(pct(engine, 50)), "engine_p95_s": rnd(pct(engine, 95)),
            "slowest": sorted(({k: rnd(r.get(k)) for k in ("latency_s", "ttft_s", "queue_wait_s", "engine_s")}
                               for r in ok), key=lambda d: -d["latency_s"])[:3],
            "completed_per_s": round(len(ok) / wall, 2) if wall else None, "completion_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1) if wall else None,
            "error_samples": [r.get("error") for r in errors[:3] + broken[:3]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--think", type=float, default=0.3, help="max seconds a client waits between answers")
    p.add_argument("--api-key", default=None)
    args = p.parse_args(argv)
    records, wall = asyncio.run(run_load(args.url.rstrip("/"), args.model, args.clients, args.seconds,
                                         args.max_tokens, args.think, args.api_key))
    report = summarize(records, wall, clients=args.clients, seconds=args.seconds, max_tokens=args.max_tokens,
                       think_s=args.think)
    print(json.dumps(report, indent=2))
    return 0 if report["errors"] == 0 and report["broken_streams"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
