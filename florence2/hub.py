"""Where a checkpoint's files are: a local folder, or a Hugging Face hub repo (downloaded with huggingface_hub, which
serves them from its local cache when there is no network or HF_HUB_OFFLINE is set).

One file at a time (`fetch`, for the processor's files), or a whole checkpoint (`resolve_checkpoint`: config.json,
the files asked for, and one weight format: safetensors when the repo has it, else pytorch_model.bin; shards too).
A file is either there, or known to be absent (the repo answered that it has none, or the cache recorded so), or
unknown: offline and not cached. Unknown is an error where the file is needed, with the repo and the file named.
"""

from __future__ import annotations

import os
from pathlib import Path

from .weights import WEIGHT_FILES, CheckpointError, shard_names


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A file of a hub checkpoint that cannot be downloaded and is not in the local Hugging Face cache."""


def local_folder(path_or_repo_id: str | os.PathLike) -> Path | None:
    """The local folder `path_or_repo_id` names, or None for a hub repo id (anything else is an error)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder that holds config.json and the weights")
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")) or repo_id.endswith("/"):
        raise CheckpointError(f"{repo_id} is neither a local folder nor a hub repo id (owner/name)")
    return None


def fetch(path_or_repo_id: str | os.PathLike, filename: str, revision: str | None = None) -> Path | None:
    """`filename` of a local checkpoint folder or hub repo: its path, or None when the checkpoint has no such file.
    Raises CheckpointNotFoundError when offline and the cache neither holds it nor recorded that it is absent."""
    folder = local_folder(path_or_repo_id)
    if folder is not None:
        return folder / filename if (folder / filename).is_file() else None
    return _download(str(path_or_repo_id), filename, revision)


def resolve_checkpoint(path_or_repo_id: str | os.PathLike, revision: str | None = None,
                       files: tuple[str, ...] = ()) -> Path:
    """The folder of a checkpoint: a local folder as it is; for a hub repo, the snapshot folder holding its
    config.json, those of `files` that it has (a file unknown offline counts as absent) and one weight format."""
    folder = local_folder(path_or_repo_id)
    if folder is not None:
        return folder
    repo_id = str(path_or_repo_id)
    config = _download(repo_id, "config.json", revision)
    if config is None:
        raise CheckpointError(f"{repo_id} has no config.json: not a model checkpoint")
    for name in files:
        try:
            _download(repo_id, name, revision)
        except CheckpointNotFoundError:
            pass
    not_cached = None
    for name in WEIGHT_FILES:  # in order of preference: the first the repo (or, offline, the cache) has
        try:
            path = _download(repo_id, name, revision)
        except CheckpointNotFoundError as e:
            not_cached = not_cached or e
            continue
        if path is not None:
            for shard in shard_names(path) if name.endswith(".index.json") else ():
                if _download(repo_id, shard, revision) is None:
                    raise CheckpointError(f"{repo_id}: {name} lists {shard}, which the repo does not have")
            return config.parent
    if not_cached is not None:
        raise not_cached
    return config.parent  # without weights: reading them says so


def _download(repo_id: str, filename: str, revision: str | None) -> Path | None:
    from huggingface_hub import _CACHED_NO_EXIST, constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError) offline, and not in the cache
        if try_to_load_from_cache(repo_id, filename, revision=revision) is _CACHED_NO_EXIST:
            return None
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "no connection to the hub"
        raise CheckpointNotFoundError(f"cannot download {filename} of {repo_id} (revision {revision or 'main'}) and "
                                      f"it is not in the local Hugging Face cache ({why})") from None
    except EntryNotFoundError:  # the repo has no such file
        return None
    except (HfHubHTTPError, OSError, ValueError) as e:  # no such repo or revision, no access, a bad id
        raise CheckpointError(f"cannot download {filename} of {repo_id} (revision {revision or 'main'}): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
