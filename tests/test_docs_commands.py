"""The commands in README.md and docs/*.md, as written.

Every shell command in their code blocks is extracted. Python command lines (`python app.py
...`, `python -m MODULE ...`, `python SCRIPT ...`) must be accepted by their own argument
parser exactly as written: each runs in a subprocess whose argparse stops right after parsing
(so a 2B export command is checked without exporting anything). `python -m pytest` lines must
name test files that exist, `pip install -r` lines files that exist. The API examples (curl
and the `openai` client snippet) run for real against `python -m server` on the tiny model,
changed only in the host and port, with the model name the docs use.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.api_support import server_subprocess, tiny_model_dir

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = ("bash", "sh", "shell", "console", "")
DOC_URLS = ("http://127.0.0.1:7860", "http://127.0.0.1:8000")

# Runs the command's own module/script with argparse stopping (exit 0) right after a parse
# that succeeded; a parse error exits 2 with argparse's message, as it would for a user.
PARSE_ONLY = textwrap.dedent("""
    import argparse, runpy, sys
    parse = argparse.ArgumentParser.parse_args
    def parse_then_stop(self, *a, **k):
        parse(self, *a, **k)
        print("PARSED", self.prog)
        raise SystemExit(0)
    argparse.ArgumentParser.parse_args = parse_then_stop
    kind, target, *args = sys.argv[1:]
    sys.argv = [target] + args
    if kind == "-m":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, __import__("os").path.dirname(target))
        runpy.run_path(target, run_name="__main__")
    raise SystemExit("the command ran without parsing any arguments")
""")


def code_blocks(text: str):
    for m in re.finditer(r"```([\w-]*)[^\n]*\n(.*?)```", text, re.S):
        yield m.group(1).lower(), m.group(2)


def shell_commands(block: str) -> list[list[str]]:
    """Command lines of a shell block: continuations joined, comments dropped, `&&` split,
    leading VAR=value assignments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = line.strip().removeprefix("$ ")
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line, comments=True)
        cmd: list[str] = []
        for w in words + ["&&"]:
            if w == "&&":
                while cmd and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", cmd[0]):
                    cmd.pop(0)
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


def documented():
    """(doc, kind, item) for every shell command and every runnable python example."""
    for doc in DOCS:
        for lang, block in code_blocks(doc.read_text(encoding="utf-8")):
            if lang in SHELL_BLOCKS:
                for cmd in shell_commands(block):
                    yield doc.name, "shell", cmd
            elif lang == "python" and "OpenAI(" in block:
                yield doc.name, "python", block


PYTHON_COMMANDS = [(doc, cmd) for doc, kind, cmd in documented()
                   if kind == "shell" and cmd[0] == "python" and cmd[1:3] != ["-m", "pytest"]]


@pytest.mark.parametrize("doc,cmd", PYTHON_COMMANDS, ids=[" ".join(c)[:80] for _, c in PYTHON_COMMANDS])
def test_python_command_lines_parse_as_written(doc, cmd):
    args = cmd[1:]
    kind, target = ("-m", args[1]) if args[0] == "-m" else ("path", str(ROOT / args[0]))
    if kind == "path":
        assert os.path.isfile(target), f"{doc}: {args[0]} does not exist"
    rest = args[2:] if kind == "-m" else args[1:]
    r = subprocess.run([sys.executable, "-c", PARSE_ONLY, kind, target, *rest], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"))
    assert r.returncode == 0 and "PARSED" in r.stdout, \
        f"{doc}: `{shlex.join(cmd)}` does not parse:\n{r.stdout[-800:]}{r.stderr[-1500:]}"


def test_test_and_install_commands_name_real_files():
    seen = 0
    for doc, kind, cmd in documented():
        if kind != "shell":
            continue
        if cmd[:3] == ["python", "-m", "pytest"]:
            for arg in cmd[3:]:
                if arg.startswith("tests/"):
                    assert (ROOT / arg.split("::")[0]).exists(), f"{doc}: {arg} does not exist"
                    seen += 1
        if cmd[:2] == ["pip", "install"] and "-r" in cmd:
            path = cmd[cmd.index("-r") + 1]
            assert (ROOT / path).is_file(), f"{doc}: {path} does not exist"
            seen += 1
    assert seen >= 3


@pytest.fixture(scope="module")
def api_server():
    """`python -m server` on the tiny model (one model: it answers to the docs' model name)."""
    with server_subprocess([tiny_model_dir(), "--threads", "1"], cwd=ROOT) as (url, proc):
        yield url, proc


def with_url(text: str, url: str) -> str:
    for doc_url in DOC_URLS:
        text = text.replace(doc_url, url)
    return text


def test_server_prints_its_url(api_server):
    url, proc = api_server
    first = proc.stdout.readline()
    assert f"OpenAI-compatible API at {url}/v1" in first


CURL = [(doc, cmd) for doc, kind, cmd in documented() if kind == "shell" and cmd[0] == "curl"]


@pytest.mark.skipif(not __import__("shutil").which("curl"), reason="no curl on this machine")
@pytest.mark.parametrize("doc,cmd", CURL, ids=[" ".join(c)[:60] for _, c in CURL])
def test_curl_examples_run_as_written(api_server, doc, cmd):
    url, _ = api_server
    cmd = [with_url(w, url) for w in cmd]
    r = subprocess.run(["bash", "-c", shlex.join(cmd)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, BITNET_API_KEY=""))
    assert r.returncode == 0, r.stderr
    assert '"error"' not in r.stdout, f"{doc}: {shlex.join(cmd)} answered an error:\n{r.stdout[:800]}"
    assert '"data"' in r.stdout or "data: " in r.stdout


PY = [(doc, block) for doc, kind, block in documented() if kind == "python"]


@pytest.mark.parametrize("doc,block", PY, ids=[d for d, _ in PY])
def test_openai_client_examples_run_as_written(api_server, doc, block):
    pytest.importorskip("openai")
    url, _ = api_server
    r = subprocess.run([sys.executable, "-c", with_url(block, url)], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, f"{doc}: the example failed:\n{r.stderr[-1500:]}"
    assert r.stdout.strip(), f"{doc}: the example printed nothing"


def test_every_doc_was_read():
    commands = list(documented())
    assert PYTHON_COMMANDS and CURL and PY, "the extraction found no commands: the test would pass vacuously"
    assert len(commands) >= 8
