"""Publishing directories to the output store: files first, then manifest.json, then COMPLETE.

A reader trusts a directory only when COMPLETE is there, so a crash mid-upload
leaves something ignored, never something half-read.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from kubetune.api.contract import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    MANIFEST_FILE,
    checkpoint_dir_name,
)

from kubetune_trainer.storage import OutputStore


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(local_dir: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, size}} for every file under local_dir (markers excluded)."""
    return {
        str(p.relative_to(local_dir)): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(local_dir.rglob("*"))
        if p.is_file() and not (p.parent == local_dir and p.name in (COMPLETE_MARKER, MANIFEST_FILE))
    }


def upload_files(store: OutputStore, local_dir: Path, rel: str, files: dict[str, Any]) -> None:
    for name in files:
        store.put_file(f"{rel}/{name}" if rel else name, local_dir / name)


def seal(store: OutputStore, rel: str, files: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Write the manifest, then the COMPLETE marker: the last two writes of any published directory."""
    manifest = {"files": files, "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {})}
    prefix = f"{rel}/" if rel else ""
    store.put_text(prefix + MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True))
    store.put_text(prefix + COMPLETE_MARKER, manifest["createdAt"] + "\n")


def checkpoint_rel(step: int) -> str:
    return f"{CHECKPOINTS_DIR}/{checkpoint_dir_name(step)}"


def complete_checkpoints(store: OutputStore) -> list[int]:
    """Steps of the checkpoints that have their COMPLETE marker, oldest first."""
    steps = []
    for name in store.list_dirs(CHECKPOINTS_DIR):
        if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX) :].isdigit():
            step = int(name[len(CHECKPOINT_PREFIX) :])
            if store.exists(f"{checkpoint_rel(step)}/{COMPLETE_MARKER}"):
                steps.append(step)
    return sorted(steps)


def prune_checkpoints(store: OutputStore, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and incomplete leftovers below the newest."""
    complete = complete_checkpoints(store)
    keep_steps = set(complete[-keep:])
    newest = complete[-1] if complete else -1
    for name in store.list_dirs(CHECKPOINTS_DIR):
        digits = name[len(CHECKPOINT_PREFIX) :]
        if not digits.isdigit():
            continue
        step = int(digits)
        if step not in keep_steps and step <= newest:
            store.delete_dir(checkpoint_rel(step))
