"""Lineage: what exactly made a model, in one place (metrics.json `lineage`), shown on the model card and in
the OCI annotations.

- every input as this run fetched it (kubetune_trainer.storage records each URI's identity and local path):
  the base model and each dataset file (train sources, eval, retain);
  - `identity`: what the node cache keyed the bytes by when they were fetched: `commit:<sha>` for `hf://`
    (the commit the hub resolved spec.model.revision to), `etag:`/`etags:` for S3, `local:` for a path;
  - the sha256 of the bytes trained on, hashed from the fetched copy (never fetched again): each dataset
    file's; for a base model not from the hub, one digest over its config and weight files (and each file's);
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


def _files(directory: Path) -> list[Path]:
    """Every file under `directory` but huggingface_hub's own bookkeeping, in path order."""
    return sorted(
        p for p in directory.rglob("*") if p.is_file() and ".cache" not in p.relative_to(directory).parts
    )


def content_digest(directory: Path) -> tuple[str, dict[str, str]]:
    """sha256 over the model's config and weight files: one digest of `name sha256` lines, and each file's."""
    picked = [p for p in _files(directory) if p.name in MODEL_FILES or p.name.endswith(WEIGHT_SUFFIXES)]
    each = {str(p.relative_to(directory)): sha256_file(p) for p in picked}
    joined = "".join(f"{name} {digest}\n" for name, digest in sorted(each.items()))
    return hashlib.sha256(joined.encode()).hexdigest(), each


def fetched(
    uri: str, spec: FineTuneJobSpec, what: str, not_found: ExitCode, **kw: Any
) -> tuple[str | None, Path]:
    """The identity and local path this process fetched `uri` under; fetched now only if it never was."""
    from kubetune_trainer import storage

    if uri not in storage.FETCHED or not storage.FETCHED[uri].exists():
        storage.fetch(uri, spec.storage, what, not_found, **kw)
    return storage.IDENTITIES.get(uri), storage.FETCHED[uri]


def rewritten(identity: str | None, path: Path) -> dict[str, bool]:
    """{"changedSinceFetched": True} for a local or PVC input rewritten while the run trained (its sha256 is of
    the new bytes, not of those trained on); remote inputs are hashed from the node cache's copy, which never changes."""
    from kubetune_trainer.log import log
    from kubetune_trainer.storage import local_identity

    if not (identity or "").startswith("local:") or local_identity(path) == identity:
        return {}
    log(f"warning: {path} changed while the run trained; the lineage's sha256 is of its bytes now")
    return {"changedSinceFetched": True}


def base_model(spec: FineTuneJobSpec) -> dict[str, Any]:
    """{source, revision?, identity}, and for a model not from the hub {sha256, files} over its config and weights."""
    identity, directory = fetched(
        spec.model.source, spec, "spec.model.source", ExitCode.MODEL_NOT_FOUND, revision=spec.model.revision
    )
    out: dict[str, Any] = {"source": spec.model.source}
    if spec.model.revision:
        out["revision"] = spec.model.revision
    out["identity"] = identity
    if not (identity or "").startswith("commit:"):
        out["sha256"], out["files"] = content_digest(directory)
    return {**out, **rewritten(identity, directory)}


def dataset_files(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """Each dataset (train sources, eval, retain; a `#split` names its file's or directory's split) with its
    identity and every file's sha256, hashed from the copy this run read."""
    from kubetune_trainer.records import split_fragment

    uris = [s.path for s in spec.dataset.train_sources()] + ([spec.dataset.eval] if spec.dataset.eval else [])
    if spec.evaluation is not None and spec.evaluation.retain is not None:
        retain = spec.evaluation.retain
        uris += [s.path for s in retain.train_sources()] + ([retain.eval] if retain.eval else [])
    out = []
    for uri in dict.fromkeys(split_fragment(u)[0] for u in uris):
        identity, path = fetched(uri, spec, "spec.dataset", ExitCode.DATASET_INVALID, repo_type="dataset")
        files = (
            {path.name: sha256_file(path)}
            if path.is_file()
            else {str(f.relative_to(path)): sha256_file(f) for f in _files(path)}
        )
        out.append({"uri": uri, "identity": identity, "files": files, **rewritten(identity, path)})
    return out


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


def collect(spec: FineTuneJobSpec) -> dict[str, Any]:
    """metrics.json's `lineage`."""
    return {
        "baseModel": base_model(spec),
        "datasets": dataset_files(spec),
        "kubetuneVersion": kubetune_version(),
        **trainer_image(),
    }


def revision(base: dict[str, Any]) -> str:
    """The base model's resolved revision: the hub commit, else `sha256:` of its config and weights."""
    identity = str(base.get("identity") or "")
    if identity.startswith("commit:"):
        return identity.removeprefix("commit:")
    return "sha256:" + base["sha256"] if base.get("sha256") else ""


def oci_annotations(lineage: dict[str, Any]) -> dict[str, str]:
    """The manifest annotations that carry the lineage (org.opencontainers.image.* and io.kubetune.*)."""
    base = lineage.get("baseModel") or {}
    out = {
        "org.opencontainers.image.version": str(lineage.get("kubetuneVersion", "")),
        "io.kubetune.base-model": str(base.get("source", "")),
        "io.kubetune.base-model.revision": revision(base),
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
