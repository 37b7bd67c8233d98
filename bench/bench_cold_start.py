"""Cold start of the playground as a Space starts it: from an empty process to the page
answering, with the 2B4T-shaped model, from the hub cache that `preload_from_hub` fills.
The model's files are dropped from the page cache first (posix_fadvise DONTNEED on those files
only), so the start reads them from disk as a fresh container does.

    python bench/bench_cold_start.py --work DIR [--cases published,checkpoint] [--threads 2]

Preparation (not timed, reused when DIR already holds it): a 2B4T-shaped checkpoint
(bench/make_2b4t_checkpoint.py, ~1.2 GB), its export (ternary,int2,int4, what the app exports
for a hub model, with its operator library), both laid out in DIR/hub as huggingface_hub's
cache stores repos (files hard-linked into blobs/).

Each case then runs `python app.py --model ORG/NAME --threads N` in a fresh network namespace
(`unshare --net`, loopback only: any network access fails), HF_HUB_OFFLINE=1, an empty build
folder and an empty export cache, and times: the page served (GET / answers 200), the first
answer (POST /v1/chat/completions, 1 token, 200), and samples the RSS of the app and its
children every 0.1 s (peak; plus the app's own VmHWM).

  published   (a) a published exported folder: CXX points at no compiler, so a compile would
              fail; the log must say the folder's operator library is used
  checkpoint  (b) the checkpoint: the operator library is compiled (ORT_INCLUDE_DIR points at
              headers already fetched, so no header download is timed) and the model exported
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PUBLISHED_ID, CHECKPOINT_ID = "bench/bitnet-2b4t-onnx", "bench/bitnet-2b4t"
VARIANTS = "ternary,int2,int4"


def log(message: str) -> None:
    print(f"[cold-start] {message}", file=sys.stderr, flush=True)


# -- preparation ---------------------------------------------------------------------------------
def prepare(work: str, layers: int | None = None) -> None:
    ckpt, export = os.path.join(work, "2b4t-ckpt"), os.path.join(work, "2b4t-onnx")
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        log(f"writing the 2B4T-shaped checkpoint into {ckpt}")
        subprocess.run([sys.executable, os.path.join(ROOT, "bench", "make_2b4t_checkpoint.py"), ckpt]
                       + (["--layers", str(layers)] if layers else []), check=True)
    if not os.path.isfile(os.path.join(export, "bitnet_onnx.json")):
        log(f"exporting it ({VARIANTS}) into {export}")
        subprocess.run([sys.executable, "-m", "export", ckpt, "--out", export, "--variants", VARIANTS,
                        "--overwrite"], cwd=ROOT, check=True)
    from custom_ops.build import LIBRARY_NAME
    from custom_ops.install import install
    from custom_ops.prebuilt import probe
    from export.publish import check_folder

    hub = os.path.join(work, "hub")
    stale = probe(os.path.join(export, LIBRARY_NAME))
    if stale:  # exported by an older version of this code: publish today's library with it
        log(f"the export's operator library is stale ({stale}); replacing it with this checkout's")
        install(export)
        shutil.rmtree(os.path.join(hub, "models--" + PUBLISHED_ID.replace("/", "--")), ignore_errors=True)
    lay_out(hub, PUBLISHED_ID, export, check_folder(export))  # exactly what publishing uploads
    lay_out(hub, CHECKPOINT_ID, ckpt, sorted(os.listdir(ckpt)))


def lay_out(hub: str, repo_id: str, folder: str, files) -> None:
    """folder's files as huggingface_hub's cache holds a downloaded repo (blobs hard-linked)."""
    repo = os.path.join(hub, "models--" + repo_id.replace("/", "--"))
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = os.path.join(repo, "snapshots", revision)
    if os.path.isdir(snapshot):
        return
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(snapshot)
    for name in files:
        src = os.path.join(folder, name)
        blob = os.path.join(repo, "blobs", hashlib.sha256(f"{repo_id}/{name}/{os.path.getsize(src)}".encode()).hexdigest())
        try:
            os.link(src, blob)
        except OSError:
            shutil.copyfile(src, blob)
        os.symlink(os.path.join("..", "..", "blobs", os.path.basename(blob)), os.path.join(snapshot, name))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(revision)


# -- one timed start -----------------------------------------------------------------------------
def tree_rss(proc) -> int:
    import psutil

    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def http_ok(url: str, body: dict | None = None, timeout: float = 600) -> bool:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def evict_from_page_cache(folder: str) -> int:
    """Drop the files under `folder` (links followed) from the page cache; returns their bytes."""
    total = 0
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.realpath(os.path.join(base, name))
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # written pages must reach the disk before they can be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


def measure(work: str, case: str, threads: int, port: int, timeout_s: float) -> dict:
    import psutil

    repo_id = PUBLISHED_ID if case == "published" else CHECKPOINT_ID
    evicted = evict_from_page_cache(os.path.join(work, "hub", "models--" + repo_id.replace("/", "--"), "snapshots"))
    scratch = tempfile.mkdtemp(prefix=f"cold-{case}-", dir=work)
    env = dict(os.environ, HF_HUB_CACHE=os.path.join(work, "hub"), HF_HUB_OFFLINE="1",
               BITNET_BUILD_DIR=os.path.join(scratch, "build"), BITNET_ONNX_CACHE=os.path.join(scratch, "cache"),
               GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS=str(threads))
    env.pop("HF_HOME", None)
    if case == "published":
        env["CXX"] = os.path.join(scratch, "no-compiler")  # a compile attempt would fail
        env["SPACE_AUTHOR_NAME"] = PUBLISHED_ID.split("/")[0]  # as on the owner's Space
    else:
        env["ORT_INCLUDE_DIR"] = headers_dir()
    url = f"http://127.0.0.1:{port}/"
    log_path = os.path.join(scratch, "app.log")
    started = time.monotonic()
    with open(log_path, "w") as out:
        app = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--model", repo_id, "--threads",
                                str(threads), "--host", "127.0.0.1", "--port", str(port)],
                               cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    proc = psutil.Process(app.pid)
    peak, page_s, answer_s = 0, None, None
    timeline = []  # (seconds since the start, log line) as the lines appear
    import threading

    stop = threading.Event()

    def sample():
        nonlocal peak
        seen = 0
        while not stop.is_set():
            peak = max(peak, tree_rss(proc))
            with open(log_path, errors="replace") as f:
                lines = f.read().splitlines()
            for line in lines[seen:]:
                if line.startswith(("[bitnet-onnx]", "[custom_ops]")) or "export" in line:
                    timeline.append((round(time.monotonic() - started, 1), line[:160]))
            seen = len(lines)
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        while time.monotonic() - started < timeout_s and app.poll() is None:
            if page_s is None and http_ok(url, timeout=5):
                page_s = time.monotonic() - started
            if page_s is not None and http_ok(url + "v1/chat/completions", {
                    "model": repo_id, "messages": [{"role": "user", "content": "Hello"}],
                    "max_tokens": 1, "temperature": 0}):
                answer_s = time.monotonic() - started
                break
            time.sleep(0.2)
        hwm = vm_hwm(app.pid)
    finally:
        stop.set()
        sampler.join()
        app.terminate()
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            app.kill()
            app.wait()
    text = open(log_path, errors="replace").read()
    library = next((line.split("] ", 1)[-1] for line in text.splitlines() if "operator library:" in line), "")
    result = {"case": case, "model": repo_id, "threads": threads, "page_s": _round(page_s),
              "first_answer_s": _round(answer_s), "peak_rss_gib": round(peak / 2**30, 2),
              "app_vmhwm_gib": round(hwm / 2**30, 2), "operator_library": library,
              "evicted_gib": round(evicted / 2**30, 2),
              "compiled": "compiling " in text and "[custom_ops] built" in text,
              "exported": "export of " in text and " finished in " in text,
              "load_average": [round(x, 2) for x in os.getloadavg()], "log": log_path,
              "timeline": timeline}
    if answer_s is None:
        result["error"] = "no answer within the timeout; see the log"
    elif case == "published" and "using the model folder's copy" not in library:
        result["error"] = "not case (a): the folder's operator library was not used"
    elif "ternary engine loaded" not in text:
        result["error"] = "the ternary engine did not load; see the log"
    return result


def _round(value):
    return None if value is None else round(value, 1)


def headers_dir() -> str:
    from custom_ops.build import include_dir

    return str(include_dir())  # fetched once here, outside the timed start


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_name() -> str:
    from custom_ops.operator_status import cpu_model

    return cpu_model()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="folder for the checkpoint, its export and the hub cache")
    parser.add_argument("--cases", default="published,checkpoint", help="published, checkpoint or both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per start")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (a quick trial, not the figure)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # already in the namespace
    args = parser.parse_args(argv)
    work = os.path.abspath(args.work)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if any(c not in ("published", "checkpoint") for c in cases):
        parser.error("--cases takes published and/or checkpoint")
    if not args.inside:
        os.makedirs(work, exist_ok=True)
        prepare(work, args.layers)
        if "checkpoint" in cases:
            headers_dir()
        # the timed starts run with no network at all: loopback only
        inner = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]), "--inside"]
        return subprocess.run(["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *inner]).returncode
    log(f"CPU: {cpu_name()}; load average before: {os.getloadavg()}")
    for case in cases:
        result = measure(work, case, args.threads, free_port(), args.timeout)
        result["cpu"] = cpu_name()
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
