"""Lineage: what exactly made a model, for the model card, metrics.json and the OCI annotations.

- the base model's resolved revision: the commit the Hugging Face hub resolved `hf://` (and
  spec.model.revision) to; for any other source, one sha256 over its config and weight files;
- each dataset file's sha256 (train sources and eval, as fetched);
- the kubetune version, and the trainer image ($KUBETUNE_TRAINER_IMAGE, set by the operator: its digest
  when the reference is digest-pinned).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Final

from kubetune.api.contract import ENV_TRAINER_IMAGE, ExitCode
from kubetune.api.models import FineTuneJobSpec
from kubetune.api.storage import sha256_file

MODEL_FILES: Final = ("config.json", "generation_config.json")
WEIGHT_SUFFIXES: Final = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".gguf",
    ".safetensors.index.json",
    ".bin.index.json",
)
HUB_METADATA: Final = (
    Path(".cache") / "huggingface" / "download"
)  # huggingface_hub's record of each file's commit


def _files(directory: Path) -> list[Path]:
    """Every file under `directory` but huggingface_hub's own bookkeeping, in path order."""
    return sorted(
        p for p in directory.rglob("*") if p.is_file() and ".cache" not in p.relative_to(directory).parts
    )


def hub_commit(directory: Path) -> str | None:
    """The commit huggingface_hub downloaded `directory` at (its metadata file's first line), if it did."""
    for name in ("config.json", "adapter_config.json"):
        meta = directory / HUB_METADATA / f"{name}.metadata"
        if meta.is_file():
            first = meta.read_text().splitlines()[:1]
            if first and len(first[0]) == 40:
                return first[0]
    return None


def content_digest(directory: Path) -> tuple[str, dict[str, str]]:
    """sha256 over the model's config and weight files: one digest of `name sha256` lines, and each file's."""
    picked = [p for p in _files(directory) if p.name in MODEL_FILES or p.name.endswith(WEIGHT_SUFFIXES)]
    each = {str(p.relative_to(directory)): sha256_file(p) for p in picked}
    joined = "".join(f"{name} {digest}\n" for name, digest in sorted(each.items()))
    return hashlib.sha256(joined.encode()).hexdigest(), each


def base_model(spec: FineTuneJobSpec, directory: Path) -> dict[str, Any]:
    """{source, revision, commit} for an `hf://` model; {source, sha256, files} for any other."""
    out: dict[str, Any] = {"source": spec.model.source}
    if spec.model.revision:
        out["revision"] = spec.model.revision
    commit = hub_commit(directory) if spec.model.source.startswith("hf://") else None
    if commit:
        out["commit"] = commit
    else:
        out["sha256"], out["files"] = content_digest(directory)
    return out


def dataset_files(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """Each dataset (train sources, eval, retain) with every file's sha256, read from the node cache."""
    from kubetune_trainer.storage import fetch

    uris = [s.path for s in spec.dataset.train_sources()] + ([spec.dataset.eval] if spec.dataset.eval else [])
    if spec.evaluation is not None and spec.evaluation.retain is not None:
        retain = spec.evaluation.retain
        uris += [s.path for s in retain.train_sources()] + ([retain.eval] if retain.eval else [])
    out = []
    for uri in dict.fromkeys(uris):
        path = fetch(uri, spec.storage, "spec.dataset", ExitCode.DATASET_INVALID, repo_type="dataset")
        files = (
            {p.name: sha256_file(p)}
            if (p := path).is_file()
            else {str(f.relative_to(path)): sha256_file(f) for f in _files(path)}
        )
        entry: dict[str, Any] = {"uri": uri, "files": files}
        if uri.startswith("hf://") and path.is_dir() and (commit := hub_commit_any(path)):
            entry["commit"] = commit
        out.append(entry)
    return out


def hub_commit_any(directory: Path) -> str | None:
    """The commit of any file huggingface_hub downloaded into `directory`."""
    for meta in (
        sorted((directory / HUB_METADATA).rglob("*.metadata")) if (directory / HUB_METADATA).is_dir() else []
    ):
        first = meta.read_text().splitlines()[:1]
        if first and len(first[0]) == 40:
            return first[0]
    return None


def trainer_image() -> dict[str, str]:
    """The image reference the operator ran this pod from, and its digest when the reference pins one."""
    ref = os.environ.get(ENV_TRAINER_IMAGE, "")
    if not ref:
        return {}
    out = {"trainerImage": ref}
    if "@sha256:" in ref:
        out["trainerImageDigest"] = "sha256:" + ref.split("@sha256:", 1)[1]
    return out


def kubetune_version() -> str:
    """The installed kubetune distribution's version (the trainer imports nothing of kubetune beyond its API)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kubetune")
    except PackageNotFoundError:
        return "unknown"


def collect(spec: FineTuneJobSpec, model_dir: Path) -> dict[str, Any]:
    """metrics.json's `lineage`."""
    return {
        "baseModel": base_model(spec, model_dir),
        "datasets": dataset_files(spec),
        "kubetuneVersion": kubetune_version(),
        **trainer_image(),
    }


def oci_annotations(lineage: dict[str, Any]) -> dict[str, str]:
    """The manifest annotations that carry the lineage (org.opencontainers.image.* and io.kubetune.*)."""
    base = lineage.get("baseModel") or {}
    out = {
        "org.opencontainers.image.version": str(lineage.get("kubetuneVersion", "")),
        "io.kubetune.base-model": str(base.get("source", "")),
        "io.kubetune.base-model.revision": str(
            base.get("commit") or ("sha256:" + base["sha256"] if base.get("sha256") else "")
        ),
        "io.kubetune.datasets": ",".join(
            f"{d['uri']}@sha256:{hashlib.sha256(''.join(f'{k} {v}' for k, v in sorted(d['files'].items())).encode()).hexdigest()}"
            for d in lineage.get("datasets") or []
        ),
    }
    if lineage.get("trainerImage"):
        out["io.kubetune.trainer-image"] = lineage["trainerImage"]
    if lineage.get("trainerImageDigest"):
        out["io.kubetune.trainer-image.digest"] = lineage["trainerImageDigest"]
    return {k: v for k, v in out.items() if v}
