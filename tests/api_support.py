"""Helpers for the API, load and fuzz tests: a tiny exported model, a real uvicorn server on a
free loopback port in a thread, and a slowed-down engine wrapper for disconnect tests."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx

_MODELS: dict = {}
_LOCK = threading.Lock()

# The tiny checkpoint whose greedy answers are varied text (tied embeddings make a random tiny
# model repeat its input): seed 1, untied lm_head. Context 128 tokens.
TINY_SEED = 1


def tiny_model_dir(variants=("ternary", "int2")) -> str:
    """An exported tiny model folder, made once per test process."""
    key = tuple(variants)
    with _LOCK:
        if key not in _MODELS:
            os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
            from export.exporter import export_checkpoint
            from tests.checkpoints import write_tiny_checkpoint

            base = tempfile.mkdtemp(prefix="bitnet-api-")
            atexit.register(shutil.rmtree, base, True)
            ckpt = write_tiny_checkpoint(os.path.join(base, "ckpt"), seed=TINY_SEED, tied=False)
            out = os.path.join(base, "tiny")
            export_checkpoint(str(ckpt), out, list(variants), progress=lambda m: None)
            _MODELS[key] = out
        return _MODELS[key]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 and a free port, in a daemon thread.

        with ServerThread(app) as url: httpx.get(url + "/v1/models")
    """

    def __init__(self, app, **config):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = dict(log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        cfg.update(config)
        self.server = uvicorn.Server(uvicorn.Config(app, **cfg))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True, name="uvicorn-test")

    def start(self, timeout: float = 30.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class SlowEngine:
    """Wraps an Engine: every event is handed on `delay_s` later, so a generation of the tiny
    model lasts long enough to disconnect from it mid-stream. The wrapped engine still does
    the work and checks the cancel flag between tokens; `steps_after_cancel` counts the events
    the engine produced after the flag was set (<= 1 means it stopped within one decode step)."""

    def __init__(self, engine, delay_s: float = 0.02):
        self.engine, self.delay_s = engine, delay_s
        self.context_length = engine.context_length
        self.model_dir = engine.model_dir
        self.variant = engine.variant
        self.steps_after_cancel: list[int] = []
        self.finish_reasons: list[str] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def stream(self, messages=None, settings=None, cancel=None, prompt=None):
        after = None
        last = None
        try:
            for event in self.engine.stream(prompt=prompt, messages=messages, settings=settings, cancel=cancel):
                if cancel is not None and cancel.is_set():
                    after = 0 if after is None else after + 1
                last = event
                yield event
                if not event.done:
                    time.sleep(self.delay_s)
        finally:
            self.steps_after_cancel.append(after if after is not None else -1)
            self.finish_reasons.append(last.finish_reason if last is not None and last.done else "abandoned")


def mount_small_page(app):
    """Mount a small Gradio Blocks at / on the API app (as app.py does with the playground)."""
    import gradio as gr

    with gr.Blocks(title="test page") as demo:
        box = gr.Textbox(label="in")
        out = gr.Textbox(label="out")
        box.submit(lambda s: s.upper(), box, out, api_name="upper")
    demo.queue(default_concurrency_limit=1, max_size=4)
    return gr.mount_gradio_app(app, demo, path="/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 5.0, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@contextlib.contextmanager
def server_subprocess(args, env_overrides=None, cwd=None, start_timeout: float = 90):
    """`python -m server ARGS --port P` in a subprocess (no API key, no Gradio analytics), waited
    for until /v1/health answers; yields (url, proc) and stops it at the end."""
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", **(env_overrides or {}))
    env.pop("BITNET_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "server", *args, "--port", str(port)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + start_timeout
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
    try:
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
