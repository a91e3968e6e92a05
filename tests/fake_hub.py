"""A fake Hugging Face hub: ``HfApi``'s repository, branch and upload methods replaced by a recorder.

``install(record)`` patches ``huggingface_hub.HfApi`` in this process; every call lands in ``record``
(a JSON file, so a second process's calls can be read back): the token the client was built with, the
repository and its visibility, the branches, and for each upload its revision and the bytes of every file
of the folder at the moment of the call (the card's text among them). ``fail_upload=True`` makes the
upload raise the hub client's own HTTP error, as a refused commit does.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import CommitInfo, RepoUrl

try:  # huggingface_hub 2 builds its HTTP errors on httpx2, 1.x on httpx
    import httpx2 as httpx
except ImportError:
    import httpx

ENDPOINT = "https://huggingface.co"
# What an earlier upload left on the branch: a top-level .bin our export replaces, and a variant the
# user keeps in a subfolder, which must survive.
EXISTING_FILES = [".gitattributes", "README.md", "pytorch_model.bin", "onnx/model.safetensors"]


def read(record: Path) -> dict:
    return json.loads(Path(record).read_text()) if Path(record).is_file() else {"calls": []}


def _log(record: Path, call: dict) -> None:
    seen = read(record)
    seen["calls"].append(call)
    Path(record).write_text(json.dumps(seen))


def install(record: str | Path, fail_upload: bool = False, patch=None) -> None:
    """Patch HfApi (with ``patch(obj, name, value)``, e.g. pytest's ``monkeypatch.setattr``)."""
    record = Path(record)
    patch = patch or setattr

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        _log(record, {"call": "create_repo", "token": self.token, "repo_id": repo_id, "private": private,
                      "exist_ok": exist_ok})  # fmt: skip
        return RepoUrl(f"{ENDPOINT}/{repo_id}")

    def create_branch(self, repo_id, *, branch, exist_ok=False, **kwargs):
        _log(record, {"call": "create_branch", "token": self.token, "repo_id": repo_id, "branch": branch})

    def upload_folder(self, *, repo_id, folder_path, revision=None, delete_patterns=None, **kwargs):
        folder = Path(folder_path)
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
        _log(record, {"call": "upload_folder", "token": self.token, "repo_id": repo_id, "revision": revision,
                      "delete_patterns": delete_patterns, "files": {k: len(v) for k, v in files.items()},
                      "card": files.get("README.md", b"").decode()})  # fmt: skip
        if fail_upload:
            request = httpx.Request("POST", f"{ENDPOINT}/api/models/{repo_id}/commit/main")
            response = httpx.Response(403, request=request, text="You don't have the rights to push here")
            raise HfHubHTTPError("403 Forbidden: you don't have the rights to push here", response=response)
        return CommitInfo(
            commit_url=f"{ENDPOINT}/{repo_id}/commit/abc123",
            commit_message=kwargs.get("commit_message") or "",
            commit_description="",
            oid="abc123",
        )

    def list_repo_files(self, repo_id, *, revision=None, **kwargs):
        _log(
            record, {"call": "list_repo_files", "token": self.token, "repo_id": repo_id, "revision": revision}
        )
        return list(EXISTING_FILES)

    patch(HfApi, "create_repo", create_repo)
    patch(HfApi, "list_repo_files", list_repo_files)
    patch(HfApi, "create_branch", create_branch)
    patch(HfApi, "upload_folder", upload_folder)
