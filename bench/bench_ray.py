"""Load comparison: the API on Ray Serve (2 replicas x 1 thread, 1 replica x 2 threads) against
the single-process server, with concurrent streaming clients using the official openai client.

    python bench/bench_ray.py MODEL_DIR [--clients 16] [--requests-per-client 4] [--max-tokens 128]
        [--configs ray-2x1,ray-1x2,single-2] [--markdown]

Every server is started with its real command (`python -m server DIR [--ray ...]`) inside a
network namespace this script creates (`unshare --net`, loopback up; needs root): Ray binds the
host's address whatever it is told, so all of this stays on loopback. The queue of every
replica / the single server is set to hold all clients (BITNET_API_QUEUE_SIZE), so a correct
run has zero errors. Reports per configuration: errors, requests per replica, time to first
token (p50/p95) and aggregate completion tokens per second over the whole run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CONFIGS = {  # name: (extra server arguments, replicas, threads per replica)
    "ray-2x1": (["--ray", "--replicas", "2", "--threads-per-replica", "1"], 2, 1),
    "ray-1x2": (["--ray", "--replicas", "1", "--threads-per-replica", "2"], 1, 2),
    "single-2": (["--threads", "2"], 1, 2),
}
REPLICA_HEADER = "x-bitnet-replica"


def interfaces() -> list[str]:
    return sorted(name for _, name in socket.if_nameindex())


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def start_server(model_dir: str, extra: list[str], port: int, queue_size: int, timeout_s: float = 180):
    # every client fits in the queue, and a big model's queue wait does not end in a 503
    env = dict(os.environ, BITNET_API_QUEUE_SIZE=str(queue_size), BITNET_API_QUEUE_TIMEOUT_S="900",
               PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "server", model_dir, "--port", str(port), *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    import httpx

    deadline = time.monotonic() + timeout_s
    if "--ray" in extra:  # the CLI prints its line once every replica is up
        for line in proc.stdout:
            if line.startswith("serving on"):
                break
        else:
            raise RuntimeError(f"the Ray server exited (rc {proc.wait()})")
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited (rc {proc.returncode})")
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError("the server did not answer /v1/health in time")


def stop_server(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # its own session: the server and what it started
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def one_stream(client, model: str, i: int, n: int, max_tokens: int) -> dict:
    t0 = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": f"Speak of the king, friend {i}-{n}."}],
        stream=True, max_tokens=max_tokens, temperature=0.8, seed=i * 1000 + n,
        stream_options={"include_usage": True})
    ttft, tokens = None, 0
    for chunk in raw.parse():
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.monotonic() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"replica": raw.headers.get(REPLICA_HEADER), "ttft_s": ttft, "tokens": tokens,
            "seconds": time.monotonic() - t0}


def load(url: str, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    one_stream(client, model, 999, 0, 8)  # warm-up (first request loads lazily in some setups)

    def run_client(i):
        out = []
        for n in range(per_client):
            try:
                out.append(one_stream(client, model, i, n, max_tokens))
            except Exception as e:  # counted as an error
                out.append({"error": f"{type(e).__name__}: {e}"[:300]})
        return out

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(run_client, range(clients)) for r in rs]
    wall = time.monotonic() - t0
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    per_replica: dict = {}
    for r in ok:
        per_replica[r["replica"] or "-"] = per_replica.get(r["replica"] or "-", 0) + 1
    ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": len(results), "ok": len(ok), "errors": errors, "per_replica": per_replica,
            "ttft_p50_s": pct(ttfts, 50), "ttft_p95_s": pct(ttfts, 95),
            "ttft_mean_s": statistics.fmean(ttfts) if ttfts else None,
            "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0}


def disconnect_check(url: str, model: str) -> str:
    from openai import OpenAI

    from tests.ray_probe import disconnect_one  # the test's own check, against this server

    job = disconnect_one(OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0), model, url)["job"]
    if job is None:
        return "not reported"
    if job["stopped_by"] == "client":
        return f"cancelled ({job['new_tokens']} tokens, {job['tokens_after_cancel']} after)"
    if job["finish_reason"] == "stop":
        return f"had ended before the client left (stop, {job['new_tokens']} tokens)"
    return f"NOT cancelled ({job['finish_reason']}, {job['new_tokens']} tokens)"


def inside(args) -> int:
    if interfaces() != ["lo"]:
        print(f"refusing to run: interfaces besides loopback are visible ({', '.join(interfaces())})",
              file=sys.stderr)
        return 3
    model = os.path.basename(os.path.normpath(args.model_dir))
    rows = []
    for k, name in enumerate(args.configs.split(",")):
        if name not in CONFIGS:
            print(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
            return 2
        extra, replicas, threads = CONFIGS[name]
        port = 8100 + k
        t0 = time.monotonic()
        proc = start_server(args.model_dir, extra, port, queue_size=args.clients)
        startup = time.monotonic() - t0
        try:
            row = load(f"http://127.0.0.1:{port}", model, args.clients, args.requests_per_client,
                       args.max_tokens)
            if "--ray" in extra:  # leave a stream mid-way: did the replica cancel the generation?
                row["disconnect"] = disconnect_check(f"http://127.0.0.1:{port}", model)
        finally:
            stop_server(proc)
        row.update(config=name, replicas=replicas, threads=threads, startup_s=startup)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    if args.markdown:
        print("\n| config | replicas x threads | clients | requests | errors | per replica | TTFT p50 s | "
              "TTFT p95 s | completion tokens | wall s | aggregate tok/s | client left mid-stream |")
        print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|")
        for r in rows:
            split = " / ".join(str(v) for v in sorted(r["per_replica"].values(), reverse=True))
            print(f"| {r['config']} | {r['replicas']} x {r['threads']} | {args.clients} | {r['requests']} | "
                  f"{len(r['errors'])} | {split} | {r['ttft_p50_s']:.3f} | {r['ttft_p95_s']:.3f} | "
                  f"{r['completion_tokens']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.1f} | "
                  f"{r.get('disconnect', '-')} |")
    return 1 if any(r["errors"] for r in rows) else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # already in the namespace
    args = p.parse_args(argv)
    args.model_dir = os.path.abspath(args.model_dir)
    if args.inside:
        return inside(args)
    print(f"start: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average "
          f"{os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs", flush=True)
    me = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]), "--inside"]
    inner = " ".join(shlex.quote(a) for a in me)
    return subprocess.call(["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {inner}"])


if __name__ == "__main__":
    sys.exit(main())
