"""Hugging Face Hub ids as inputs: ``org/name`` or ``org/name@revision`` resolved to a local snapshot folder.

An existing local path always wins. Otherwise the id is looked up in the local Hugging Face
cache (``HF_HUB_CACHE`` / ``HF_HOME``) first and, when that has no complete snapshot and the
network is allowed (no ``HF_HUB_OFFLINE``), downloaded there (weights as safetensors, configs,
tokenizer files; never pickles). Torch-free.
"""

from __future__ import annotations

import os
import re

from streammerge.errors import StreamMergeError

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.md"]
"""What a download fetches: weights as safetensors, configs and index, tokenizer and chat template, the README."""


def hub_id(text: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``text`` looks like a Hub id and is not a local path, else None."""
    if os.path.exists(text):
        return None
    m = _HUB_ID.match(text)
    return (m["repo"], m["revision"]) if m else None


def resolve(path: str | os.PathLike[str], what: str = "model") -> str:
    """A local folder for ``path``: the path itself, or the cached (or downloaded) snapshot of a Hub id.

    Raises StreamMergeError naming the id, the revision and the cache folder searched when it is
    neither a local path nor obtainable.
    """
    text = os.fspath(path)
    found = hub_id(text)
    if found is None:
        return text
    repo, revision = found
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:
        raise StreamMergeError(f"{text}: no such folder, and huggingface_hub (to look it up as a Hub id) is not installed") from e
    where = f"{repo}" + (f" at revision {revision}" if revision else "")
    try:
        return str(snapshot_download(repo, revision=revision, local_files_only=True, allow_patterns=ALLOW_PATTERNS))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    if constants.HF_HUB_OFFLINE:
        raise StreamMergeError(
            f"{text}: no such folder, and the {what} {where} is not in the Hugging Face cache {constants.HF_HUB_CACHE} "
            "(HF_HUB_OFFLINE is set, so it was not downloaded)"
        )
    try:
        return str(snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:200]
        raise StreamMergeError(
            f"{text}: no such folder, not in the Hugging Face cache {constants.HF_HUB_CACHE}, and downloading the {what} {where} "
            f"failed ({reason})"
        ) from e
