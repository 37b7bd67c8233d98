"""Helpers (no tests) for the publish and published-folder tests, all offline: a fake hub API
that records the calls and keeps what was uploaded, and a hub cache laid out the way
huggingface_hub stores repos (models--ORG--NAME/blobs, snapshots/<revision>/ links, refs/main)."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil


class FakeHubApi:
    """Records create_repo / upload_folder as huggingface_hub.HfApi receives them; `repos` holds
    each repo's files after the uploads ({repo_id: {path: bytes}})."""

    def __init__(self, fail: Exception | None = None):
        self.calls, self.repos, self.fail = [], {}, fail

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        if self.fail:
            raise self.fail
        self.repos.setdefault(repo_id, {})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, delete_patterns=None, **kw):
        self.calls.append(("upload_folder", repo_id, dict(kw, folder_path=folder_path,
                                                          allow_patterns=allow_patterns,
                                                          delete_patterns=delete_patterns)))
        files = self.repos.setdefault(repo_id, {})
        local = {}
        for base, _, names in os.walk(folder_path):
            for name in names:
                rel = os.path.relpath(os.path.join(base, name), folder_path).replace(os.sep, "/")
                if allow_patterns is None or any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                    with open(os.path.join(base, name), "rb") as f:
                        local[rel] = f.read()
        for rel in list(files):  # as the hub does: delete_patterns spare what is uploaded
            if rel not in local and any(fnmatch.fnmatch(rel, p) for p in delete_patterns or []):
                del files[rel]
        files.update(local)
        return f"https://huggingface.co/{repo_id}/commit/0"

    def uploaded(self, repo_id) -> set:
        return set(self.repos.get(repo_id, {}))

    def write_repo(self, repo_id, folder) -> str:
        """The repo's files as a plain folder (what a download would give)."""
        os.makedirs(folder, exist_ok=True)
        for rel, data in self.repos[repo_id].items():
            os.makedirs(os.path.dirname(os.path.join(folder, rel)) or folder, exist_ok=True)
            with open(os.path.join(folder, rel), "wb") as f:
                f.write(data)
        return str(folder)


def put_in_hub_cache(hub_cache, repo_id: str, folder: str, skip=(), revision_seed: str = "r1") -> str:
    """Lay `folder`'s files out as huggingface_hub's cache does; returns the snapshot folder."""
    repo_dir = os.path.join(hub_cache, "models--" + repo_id.replace("/", "--"))
    revision = hashlib.sha1((repo_id + revision_seed).encode()).hexdigest()
    snapshot = os.path.join(repo_dir, "snapshots", revision)
    os.makedirs(os.path.join(repo_dir, "blobs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    for name in sorted(os.listdir(folder)):
        if name in skip or not os.path.isfile(os.path.join(folder, name)):
            continue
        with open(os.path.join(folder, name), "rb") as f:
            blob = hashlib.sha256(f.read()).hexdigest()
        shutil.copyfile(os.path.join(folder, name), os.path.join(repo_dir, "blobs", blob))
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, name))
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(revision)
    return snapshot
