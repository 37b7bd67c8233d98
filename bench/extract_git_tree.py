"""Extracts a commit's tree from a git directory file by file, skipping the blobs the copy lacks.

    python bench/extract_git_tree.py GIT_DIR OUT [--rev HEAD]

A partial snapshot of a public repository (a mirror whose largest blobs are listed but absent)
cannot be checked out or `git archive`d: both stop at the first missing blob. This writes every
blob that is present (with its executable bit), lists the missing ones, and needs nothing but
git. bench/bench_peers.py builds ik_llama.cpp from such a folder (--ik-source); the files it
needs for llama-bench and llama-quantize are all small sources.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def extract(git_dir: Path, out: Path, rev: str = "HEAD") -> tuple[int, list[str]]:
    """(files written, paths whose blobs are missing)."""
    listing = subprocess.run(["git", "--git-dir", str(git_dir), "ls-tree", "-r", "-z", rev],
                             check=True, capture_output=True).stdout.decode().split("\0")
    entries = []
    for line in filter(None, listing):
        meta, path = line.split("\t", 1)
        mode, kind, sha = meta.split()
        if kind == "blob" and mode != "120000":  # symlinks and submodules are not needed to build
            entries.append((mode, sha, path))
    batch = subprocess.Popen(["git", "--git-dir", str(git_dir), "cat-file", "--batch"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    written, missing = 0, []
    for mode, sha, path in entries:
        batch.stdin.write(sha.encode() + b"\n")
        batch.stdin.flush()
        header = batch.stdout.readline().split()
        if len(header) < 3 or header[1] != b"blob":  # "<sha> missing"
            missing.append(path)
            continue
        data = batch.stdout.read(int(header[2]))
        batch.stdout.read(1)  # the newline after the contents
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        if mode == "100755":
            target.chmod(0o755)
        written += 1
    batch.stdin.close()
    batch.wait()
    return written, missing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("git_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--rev", default="HEAD")
    args = ap.parse_args(argv)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        # the tree's files would overwrite whatever of the same names is there
        print(f"{args.out} exists and is not an empty folder: give a new or empty one", file=sys.stderr)
        return 1
    written, missing = extract(args.git_dir, args.out, args.rev)
    print(f"{written} files written to {args.out}; {len(missing)} missing blobs skipped"
          + (": " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "") if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
