"""Serve a model folder on Ray Serve and exercise it; prints one JSON line of what happened
(after RESULT_PREFIX).

Must run inside a network namespace of its own, because Ray binds the host's address whatever
it is told (tests/test_ray_serve.py starts it that way):

    unshare --net sh -c 'ip link set lo up && python tests/ray_probe.py MODEL_DIR --replicas 2'

It refuses to run when any network interface besides loopback is visible.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from server.ray_serve import REPLICA_HEADER, ApiReplica, RayOptions, start  # noqa: E402


RESULT_PREFIX = "RAY_PROBE_RESULT "  # Ray's own processes print to the same stdout


def interfaces() -> list[str]:
    """Network interfaces of this process's network namespace (not /sys/class/net, which
    shows the namespace sysfs was mounted in)."""
    return sorted(name for _, name in socket.if_nameindex())


class SlowReplica(ApiReplica):
    """The real engine, each decode step of the replica's batcher a little longer (each event
    handed on later without a batcher), so that a generation of the tiny demo model lasts long
    enough to disconnect from it mid-stream and concurrent requests share decode steps."""

    delay_s = 0.01

    def serve_engine(self, engine, batch):
        served = super().serve_engine(engine, batch)
        if served.batcher is not None:
            served.batcher.step_observers.append(lambda size: time.sleep(self.delay_s))
            return served
        from tests.api_support import SlowEngine

        return SlowEngine(served, self.delay_s)


def stream_one(client, model: str, i: int, max_tokens: int) -> dict:
    t0 = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": f"Tell me of kings, {i}."}],
        stream=True, max_tokens=max_tokens, temperature=0.8, seed=i,
        stream_options={"include_usage": True})
    replica = raw.headers.get(REPLICA_HEADER)
    text, usage, ttft, batch = [], None, None, None
    for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft if ttft is not None else time.monotonic() - t0
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
        extra = (chunk.model_extra or {}).get("bitnet")
        if extra:
            batch = extra.get("max_batch_size")
    return {"replica": replica, "chars": len("".join(text)), "ttft_s": ttft,
            "completion_tokens": usage.completion_tokens if usage else None,
            "max_batch_size": batch, "seconds": time.monotonic() - t0}


def disconnect_one(client, model: str, base_url: str) -> dict:
    """Start a long stream, read two chunks, close the connection; then ask the replica that
    served it what became of the generation."""
    import httpx

    max_tokens = 400
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Speak at length of the sea."}],
        # temperature 2 / seed 7: the demo model writes all 400 tokens (no early end of turn), so
        # even at full speed the generation is still running when the client leaves
        stream=True, max_tokens=max_tokens, temperature=2.0, seed=7)
    # the completion id (Ray's proxy adds its own x-request-id next to ours in the headers)
    replica, request_id = raw.headers.get(REPLICA_HEADER), None
    stream = raw.parse()
    for n, chunk in enumerate(stream):
        request_id = chunk.id
        if n >= 2:
            break
    stream.close()
    closed_at = time.monotonic()
    job, asked = None, 0
    with httpx.Client(base_url=base_url, timeout=10) as http:
        while time.monotonic() - closed_at < 20:
            r = http.get("/ray/replica")
            asked += 1
            if r.headers.get(REPLICA_HEADER) != replica:
                continue  # Ray routed this one to the other replica
            job = next((j for j in r.json()["jobs"] if j["id"] == request_id), None)
            if job is not None and job["state"] not in ("queued", "running"):
                break
            time.sleep(0.05)
    return {"replica": replica, "request_id": request_id, "max_tokens": max_tokens, "job": job,
            "settled_s": round(time.monotonic() - closed_at, 3), "replica_queries": asked}


def error_answers(base_url: str, model: str) -> dict:
    """Status and error code of a few bad requests: the server's own checks, behind Ray."""
    import httpx

    cases = {
        "other_model_name": ("POST", "/v1/chat/completions", {"json": {"model": "nope", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}}),
        "no_messages": ("POST", "/v1/chat/completions", {"json": {"model": model}}),
        "bad_json": ("POST", "/v1/chat/completions", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
        "bad_temperature": ("POST", "/v1/chat/completions", {"json": {"model": model, "temperature": 9, "messages": [{"role": "user", "content": "hi"}]}}),
        "unknown_route": ("GET", "/v1/nothing", {}),
        "wrong_method": ("GET", "/v1/chat/completions", {}),
    }
    out = {}
    with httpx.Client(base_url=base_url, timeout=30) as http:
        for name, (method, path, kw) in cases.items():
            r = http.request(method, path, **kw)
            try:
                body = r.json()
                code = body["error"]["code"] if "error" in body else body.get("object")
            except Exception:  # noqa: BLE001 - not JSON: reported as such
                code = f"not JSON: {r.text[:80]!r}"
            out[name] = [r.status_code, code]
    return out


def single_process_error_answers(model_dir: str, model: str) -> dict:
    """The same bad requests against the single-process server (in this process, loopback)."""
    from runtime import Engine
    from server import create_api
    from tests.api_support import ServerThread

    with ServerThread(create_api({model: Engine(model_dir, threads=1)})) as url:
        return error_answers(url, model)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads-per-replica", type=int, default=1)
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    if interfaces() != ["lo"]:
        print("ray_probe: refusing to run: interfaces besides loopback are visible "
              f"({', '.join(interfaces())}); run it under unshare --net",
              file=sys.stderr)
        return 3

    from openai import OpenAI

    t0 = time.monotonic()
    temp_dir = tempfile.mkdtemp(prefix="rayp", dir="/tmp")  # short: Ray's socket paths must fit
    url = start(args.model_dir, options=RayOptions(args.replicas, args.threads_per_replica),
                port=args.port, num_cpus=max(2, args.replicas * args.threads_per_replica),
                temp_dir=temp_dir, replica_class=SlowReplica)
    startup_s = time.monotonic() - t0
    model = os.path.basename(os.path.normpath(args.model_dir))
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

    results, errors = [], []
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        futures = [pool.submit(stream_one, client, model, i, args.max_tokens) for i in range(args.requests)]
        for f in futures:
            try:
                results.append(f.result())
            except Exception as e:  # counted, reported
                errors.append(f"{type(e).__name__}: {e}")
    per_replica: dict = {}
    for r in results:
        per_replica[r["replica"]] = per_replica.get(r["replica"], 0) + 1
    replicas = {}
    import httpx

    with httpx.Client(base_url=url, timeout=10) as http:
        for _ in range(20):  # Ray routes each GET to some replica: ask until both answered
            r = http.get("/ray/replica").json()
            replicas[r["replica"]] = {"max_batch_size": r["max_batch_size"], "batcher": r["batcher"]}
            if len(replicas) >= args.replicas:
                break
    disconnect = disconnect_one(client, model, url)
    errors_behind_ray = error_answers(url, model)
    errors_alone = single_process_error_answers(args.model_dir, model)
    print(RESULT_PREFIX + json.dumps({"startup_s": round(startup_s, 2), "requests": args.requests,
                      "ok": len(results), "errors": errors, "per_replica": per_replica,
                      "completion_tokens": [r["completion_tokens"] for r in results],
                      "max_batch_sizes": [r["max_batch_size"] for r in results], "replicas": replicas,
                      "disconnect": disconnect, "error_answers": errors_behind_ray,
                      "error_answers_single_process": errors_alone}), flush=True)
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)  # Ray's session logs of this run
    return 0


if __name__ == "__main__":
    sys.exit(main())
