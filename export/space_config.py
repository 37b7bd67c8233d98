"""The Space's configuration: the YAML front matter of README.md, checked against the rules the
Hugging Face Hub applies when a Space is pushed.

    meta = read_front_matter("README.md")
    problems = front_matter_problems(meta, gradio_pin=gradio_pin("requirements.txt"))
    python -m export.space_config [REPO_DIR]   # the same checks, plus binaries outside LFS

Keys and value types follow the Hub's "Spaces Configuration Reference" (hub-docs,
docs/hub/spaces-config-reference.md, version of 2026-03-20, read 2026-12-06); the 60-character limit of
`short_description` is the Hub's push check ('"short_description" length must be less than or
equal to 60 characters long'), which that page does not state. `published_front_matter` writes
the front matter of a Space serving a published exported folder (docs/SPACES.md).
"""

from __future__ import annotations

import re

import yaml

COLORS = ("red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray")
SDKS = ("gradio", "docker", "static")
HARDWARE = ("cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "l4x4", "l40sx1", "l40sx4",
            "l40sx8", "a10g-small", "a10g-large", "a10g-largex2", "a10g-largex4", "a100-large",
            "a100x4", "a100x8")
SHORT_DESCRIPTION_MAX = 60

# key -> the type the reference gives it (str, bool, int, "list[str]", dict)
SPACE_KEYS = {
    "title": str, "emoji": str, "colorFrom": str, "colorTo": str, "sdk": str,
    "python_version": str, "sdk_version": str, "suggested_hardware": str, "app_file": str,
    "app_build_command": str, "app_port": int, "base_path": str, "fullWidth": bool, "header": str,
    "short_description": str, "models": "list[str]", "datasets": "list[str]", "tags": "list[str]",
    "thumbnail": str, "pinned": bool, "hf_oauth": bool, "hf_oauth_scopes": "list[str]",
    "hf_oauth_expiration_minutes": int, "disable_embedding": bool,
    "startup_duration_timeout": str, "custom_headers": dict, "preload_from_hub": "list[str]",
    # repository card metadata every hub repo may carry
    "license": str,
}
REQUIRED = ("title", "sdk", "sdk_version", "app_file", "short_description")
# "suggested_storage" is in the reference but ignored: persistent storage is no longer offered.
RETIRED = {"suggested_storage": "persistent storage is no longer offered; the Hub ignores it"}

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
DURATION = re.compile(r"^\d+(s|m|h|d)$")
PYTHON_VERSION = re.compile(r"^3\.\d+(\.\d+)?$")
SDK_VERSION = re.compile(r"^\d+\.\d+(\.\d+)?([.-]?\w+)?$")


class FrontMatterError(ValueError):
    """README.md has no front matter block, or it is not YAML."""


def read_front_matter(readme_path) -> dict:
    """The YAML block between the first two `---` lines of README.md."""
    with open(readme_path, encoding="utf-8") as f:
        text = f.read()
    match = re.match(r"^---\s*\n(.*?\n)---\s*\n", text, re.S)
    if not match:
        raise FrontMatterError(f"{readme_path} does not start with a `---` front matter block")
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as e:
        raise FrontMatterError(f"{readme_path}: the front matter is not valid YAML: {e}") from None
    if not isinstance(meta, dict):
        raise FrontMatterError(f"{readme_path}: the front matter is not a mapping")
    return meta


def gradio_pin(requirements_path) -> str | None:
    """The version of `gradio==X` in a requirements file (None when gradio is not pinned)."""
    with open(requirements_path, encoding="utf-8") as f:
        for line in f:
            match = re.match(r"^\s*gradio\s*==\s*([^\s;#]+)", line)
            if match:
                return match.group(1)
    return None


def _type_ok(value, kind) -> bool:
    if kind == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def preload_entry_problems(entry: str) -> list[str]:
    """`REPO`, `REPO FILE,FILE` or `REPO FILE,FILE COMMIT_SHA`: what is wrong with one entry."""
    parts = entry.split()
    if not 1 <= len(parts) <= 3:
        return [f"preload_from_hub entry {entry!r}: expected 'REPO [FILE,FILE,... [COMMIT_SHA]]'"]
    problems = []
    if not REPO_ID.match(parts[0]):
        problems.append(f"preload_from_hub entry {entry!r}: {parts[0]!r} is not a repo id ORG/NAME")
    if len(parts) >= 2:
        files = parts[1].split(",")
        if any(not f or f.startswith("/") or ".." in f.split("/") for f in files):
            problems.append(f"preload_from_hub entry {entry!r}: the file list must be comma-separated "
                            "relative paths with no empty item")
        if len(set(files)) != len(files):
            problems.append(f"preload_from_hub entry {entry!r}: a file is listed twice")
    if len(parts) == 3 and not COMMIT_SHA.match(parts[2]):
        problems.append(f"preload_from_hub entry {entry!r}: {parts[2]!r} is not a 40-hex commit sha")
    return problems


def front_matter_problems(meta: dict, gradio_pin: str | None = None) -> list[str]:
    """Every rule of the Spaces configuration the front matter breaks (empty: the Hub accepts it)."""
    problems = []
    for key in REQUIRED:
        if key not in meta:
            problems.append(f"{key}: missing")
    for key, value in meta.items():
        if key in RETIRED:
            problems.append(f"{key}: {RETIRED[key]}")
            continue
        if key not in SPACE_KEYS:
            problems.append(f"{key}: not a Spaces configuration key")
            continue
        kind = SPACE_KEYS[key]
        if not _type_ok(value, kind):
            name = kind if isinstance(kind, str) else kind.__name__
            problems.append(f"{key}: must be a {name}, got {type(value).__name__} {value!r}"
                            + (" (quote it: YAML reads 3.10 as the number 3.1)" if key == "python_version" else ""))
    if problems:
        return problems  # the checks below assume the types are right

    def check(key, ok, why):
        if key in meta and not ok(meta[key]):
            problems.append(f"{key}: {meta[key]!r} {why}")

    check("short_description", lambda v: 0 < len(v) <= SHORT_DESCRIPTION_MAX,
          f"is {len(meta.get('short_description', ''))} characters; the Hub allows 1 to {SHORT_DESCRIPTION_MAX}")
    check("emoji", lambda v: 0 < len(v) <= 4 and not v.isascii(), "is not one emoji")
    check("colorFrom", lambda v: v in COLORS, f"is not one of {', '.join(COLORS)}")
    check("colorTo", lambda v: v in COLORS, f"is not one of {', '.join(COLORS)}")
    check("sdk", lambda v: v in SDKS, f"is not one of {', '.join(SDKS)}")
    check("python_version", lambda v: bool(PYTHON_VERSION.match(v)), "is not a Python 3.x or 3.x.x version")
    check("sdk_version", lambda v: bool(SDK_VERSION.match(v)), "is not a version number")
    check("suggested_hardware", lambda v: v in HARDWARE, "is not a hardware flavor of the reference")
    check("startup_duration_timeout", lambda v: bool(DURATION.match(v)), "is not a duration like 30m or 1h")
    check("header", lambda v: v in ("mini", "default"), "is not mini or default")
    check("base_path", lambda v: v.startswith("/"), "does not start with /")
    check("models", lambda v: all(REPO_ID.match(m) for m in v), "holds an entry that is not a repo id ORG/NAME")
    check("datasets", lambda v: all(REPO_ID.match(m) for m in v), "holds an entry that is not a repo id ORG/NAME")
    check("app_port", lambda v: 0 < v < 65536, "is not a TCP port")
    if meta.get("sdk") == "gradio" and gradio_pin is not None and meta.get("sdk_version") != gradio_pin:
        problems.append(f"sdk_version: {meta.get('sdk_version')!r} differs from the gradio pin "
                        f"{gradio_pin!r} of requirements.txt (the Space would run another Gradio)")
    for entry in meta.get("preload_from_hub", []):
        problems.extend(preload_entry_problems(entry))
    return problems


def published_front_matter(repo_id: str, files, base: dict) -> dict:
    """The front matter of a Space serving the published exported folder `repo_id`: `base`
    (the repository's own front matter) with the folder preloaded instead of a checkpoint and
    the repo linked as the Space's model. `files`: what the start reads from the folder."""
    if not REPO_ID.match(repo_id):
        raise ValueError(f"{repo_id!r} is not a repo id of the form ORG/NAME")
    meta = dict(base)
    meta["models"] = [repo_id]
    meta["preload_from_hub"] = [f"{repo_id} {','.join(sorted(files))}"]
    meta.pop("startup_duration_timeout", None)  # the default 30 min is plenty without an export
    return meta


def dump_front_matter(meta: dict) -> str:
    """The `---` block for README.md (keys in the given order, python_version quoted)."""
    body = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{body}---\n"


# -- the repository's files as the Hub sees them on a push ---------------------------------------
BINARY_LIMIT = 1_000_000  # bytes: a binary file larger than this must be in LFS/Xet
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"


def is_binary(path) -> bool:
    """git's own test: a NUL byte in the first 8000 bytes."""
    with open(path, "rb") as f:
        return b"\0" in f.read(8000)


def _git(repo, *args, env=None) -> str:
    import subprocess

    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True, env=env).stdout


def lfs_filter_of(repo, paths) -> dict:
    """{path: value of the `filter` attribute} as the repository's .gitattributes files set it,
    ignoring this clone's own overrides (.git/info/attributes, the user's attributes file):
    git reads them through an empty repository with the same work tree."""
    import os
    import tempfile

    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    with tempfile.TemporaryDirectory(prefix="attrs.") as empty:
        _git(empty, "init", "-q", env=env)
        out = _git(empty, f"--work-tree={os.path.abspath(repo)}", "check-attr", "filter", "--",
                   *paths, env=env)
    found = {}
    for line in out.splitlines():
        path, _, value = line.rpartition(": ")
        found[path.rsplit(": filter", 1)[0]] = value
    return found


def binaries_without_lfs_rule(repo, limit: int = BINARY_LIMIT) -> list[str]:
    """Tracked binary files over `limit` bytes that no .gitattributes rule sends to LFS/Xet."""
    import os

    tracked = [p for p in _git(repo, "ls-files", "-z").split("\0") if p]
    big = [p for p in tracked if os.path.isfile(os.path.join(repo, p))
           and os.path.getsize(os.path.join(repo, p)) > limit and is_binary(os.path.join(repo, p))]
    if not big:
        return []
    filters = lfs_filter_of(repo, big)
    return [p for p in big if filters.get(p) != "lfs"]


def main(argv=None) -> int:
    import argparse
    import os
    import sys

    parser = argparse.ArgumentParser(prog="python -m export.space_config",
                                     description="Check a Space's repository as the Hub would on a push: "
                                                 "README.md front matter, binaries over 1 MB outside LFS/Xet.")
    parser.add_argument("repo", nargs="?", default=".", help="the Space's repository folder (default: .)")
    args = parser.parse_args(argv)
    try:
        meta = read_front_matter(os.path.join(args.repo, "README.md"))
    except (OSError, FrontMatterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    requirements = os.path.join(args.repo, "requirements.txt")
    problems = front_matter_problems(meta, gradio_pin(requirements) if os.path.isfile(requirements) else None)
    if os.path.isdir(os.path.join(args.repo, ".git")) or os.path.isfile(os.path.join(args.repo, ".git")):
        problems += [f"{p}: a binary over 1 MB with no filter=lfs rule in .gitattributes"
                     for p in binaries_without_lfs_rule(args.repo)]
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"{os.path.join(args.repo, 'README.md')}: the Hub accepts this Space configuration")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
