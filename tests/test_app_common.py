"""Helpers (no tests) for the playground tests: a tiny exported model and `python app.py` on a local port.

    folder = make_tiny_model(tmp_path)          # exported with our exporter (tests/checkpoints.py)
    with AppServer(folder, tmp_path) as server:  # a real `python app.py` process
        client = server.client()                 # gradio_client.Client, model ready
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Long enough context that a generation can be stopped midway (the tiny model decodes
# ~1000 tokens/s), short enough that an overlong message is cheap to build.
TINY_CONTEXT = 8192


def make_tiny_model(base: Path, context: int = TINY_CONTEXT) -> str:
    """A random stand-in checkpoint (tests/stand_in.py: random weights, byte-level tokenizer: one printable
    byte per generated token, so token counts are checkable from the text), exported with our
    exporter in every variant. tests/checkpoints.py's tiny models need torch and a word-level
    tokenizer whose unknown words map to the end-of-text id, so they end their turn at once."""
    from export import export_checkpoint
    from tests.stand_in import write_stand_in_checkpoint

    # never ends its turn by itself: the stop and cancel tests need answers that run on
    ckpt = write_stand_in_checkpoint(base / "ckpt", seed=3, context=context, end_of_turn_scale=0.0)
    out = base / "onnx"
    export_checkpoint(str(ckpt), str(out), ["ternary", "int2", "int4", "fp32"], progress=lambda m: None)
    return str(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python app.py --model FOLDER` in a subprocess; stopped (by its pid) on exit."""

    def __init__(self, model: str, workdir: Path, extra_args=(), env=None, ready_timeout: float = 120):
        self.model, self.workdir = model, Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.extra_args = list(extra_args)
        self.env = dict(os.environ, BITNET_ONNX_CACHE=str(self.workdir / "cache"),
                        GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
        self.env.update(env or {})
        self.ready_timeout = ready_timeout
        self.proc = None
        self.log_path = self.workdir / f"app-{self.port}.log"

    def __enter__(self):
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--model", self.model, "--host", "127.0.0.1",
             "--port", str(self.port), "--threads", "1", *self.extra_args],
            cwd=str(ROOT), env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()
        return self

    def _wait_ready(self):
        from gradio_client import Client

        deadline = time.time() + self.ready_timeout
        client = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                client = client or Client(self.url, verbose=False)
                status = client.predict(api_name="/status")
                if status["state"] == "ready":
                    self.status = status
                    return
                if status["state"] == "failed":
                    raise RuntimeError(f"model preparation failed: {status['error']}")
            except (OSError, ValueError, ConnectionError) as e:  # server not up yet
                last = e
                client = None
            except Exception as e:  # noqa: BLE001 - httpx errors while starting
                if "Connect" not in type(e).__name__ and "connect" not in str(e).lower():
                    raise
                last = e
                client = None
            time.sleep(0.5)
        raise TimeoutError(f"app not ready in {self.ready_timeout} s ({last!r}):\n{self.log_text()}")

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False)

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()
