"""The Hugging Face Hub upload of an exported folder: timm's name for the model there, the repository id
and the token checked before anything is exported, and the one-commit upload."""

from __future__ import annotations

import os
from pathlib import Path

from timm_cskd.checkpoint import CheckpointError

__all__ = ["UploadError", "check_repo_id", "hub_name", "hub_token", "push_folder"]

WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pth", ".pth.tar")


class UploadError(Exception):
    """The hub refused or never received the upload (the local export is complete)."""


def hub_name(repo_id: str, revision: str | None) -> str:
    """timm's name for a hub model, ``hf-hub:ORG/NAME[@REVISION]``."""
    return f"hf-hub:{repo_id}" + (f"@{revision}" if revision else "")


def check_repo_id(repo_id: str) -> None:
    """The repository must be named in full: the card names it before the hub is asked anything."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise CheckpointError(f"--push-to-hub {repo_id}: not a valid repository id ({e})") from None
    if "/" not in repo_id:
        raise CheckpointError(f"--push-to-hub {repo_id}: name the repository as ORG/NAME (or USER/NAME)")


def hub_token() -> str:
    """The token huggingface_hub itself would use (``get_token``: HF_TOKEN, then the saved ``hf auth
    login``), checked before anything is exported."""
    from huggingface_hub import constants, get_token

    # huggingface_hub reads HF_HUB_OFFLINE once, at its import; the variable is read again here so
    # one set later in this process still refuses rather than ends in a connection error.
    # constants.HF_HUB_OFFLINE exists in every release (is_offline_mode() only from 1.2.1); the library
    # also honours TRANSFORMERS_OFFLINE.
    if constants.HF_HUB_OFFLINE or any(
        os.environ.get(name, "").upper() in constants.ENV_VARS_TRUE_VALUES
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        raise CheckpointError(
            "--push-to-hub: HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it, "
            "or export without --push-to-hub"
        )
    token = get_token()
    if token is None:
        raise CheckpointError(
            "--push-to-hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN "
            "(a write token from your hub settings)"
        )
    return token


def push_folder(
    folder: Path, repo_id: str, token: str, *, private: bool = False, revision: str | None = None
) -> str:
    """Upload the exported folder as it is, in one commit (the hub applies all of it or none), and return
    the commit's URL. timm's push_to_hf_hub would re-save into a temporary folder and keep an existing
    card, so the folder we tested locally would not be what lands on the hub."""
    from huggingface_hub import HfApi

    api = HfApi(token=token, library_name="timm-cskd")
    try:
        # private=None, not False: a new repository then takes its organisation's default visibility.
        repo = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision is not None:
            api.create_branch(repo.repo_id, branch=revision, exist_ok=True)
        # Weights of an earlier upload at the top level would sit beside ours, and timm <= 1.0.28 loads a
        # .bin first; the hub matches delete patterns with fnmatch ("*" crosses "/"), so name each file,
        # and leave whatever the user keeps in subfolders.
        stale = [
            name
            for name in api.list_repo_files(repo.repo_id, revision=revision)
            if "/" not in name and name.endswith(WEIGHT_SUFFIXES) and not (folder / name).is_file()
        ]
        commit = api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=str(folder),
            revision=revision,
            commit_message="Add timm-cskd model",
            delete_patterns=stale or None,
        )
    # Whatever the client raises (HTTP status, network, its own checks), the commit did not land.
    except Exception as e:
        raise UploadError(
            f"--push-to-hub {repo_id}: the upload failed ({type(e).__name__}: {e}); a hub commit lands "
            f"whole or not at all, and the export in {folder} is complete: rerun to upload it"
        ) from e
    return commit.commit_url
