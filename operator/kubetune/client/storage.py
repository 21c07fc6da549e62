"""Downloading a job's artifacts: S3 (the job's own storage settings) or a local directory.

Every file listed in the output's manifest.json is checked against its sha256 after the
download, so a partial or corrupted copy is an error, not a model that loads wrongly.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kubetune.api.contract import (
    CARD_FILE,
    EVAL_PLOT,
    LOSS_PLOT,
    MANIFEST_FILE,
    ArtifactManifest,
    ManifestMismatch,
)
from kubetune.api.models import Artifacts, StorageSpec
from kubetune.api.storage import s3_client, split_s3

Which = Literal["auto", "model", "adapter", "all"]


class DownloadError(Exception):
    pass


def _unreachable(where: str, storage: StorageSpec, exc: Exception) -> DownloadError:
    """A one-line error for S3 that cannot be reached from this machine (often spec.storage.endpoint is an
    in-cluster address such as http://minio.minio.svc:9000): names it and the way to point elsewhere."""
    from botocore.exceptions import EndpointConnectionError

    if isinstance(exc, EndpointConnectionError):
        return DownloadError(
            f"{where}: cannot connect to S3 at {storage.endpoint or 'the default AWS endpoint'} from "
            "this machine; if that is an in-cluster address, pass the one you reach it at with "
            "--s3-endpoint URL (SDK: endpoint=)"
        )
    return DownloadError(f"{where}: {exc}")


def output_root(arts: Artifacts) -> str:
    """spec.output.uri: the directory every artifact lives under (the manifest's parent)."""
    if not arts.manifest:
        raise DownloadError("the job has no artifacts yet (status.artifacts is empty)")
    return arts.manifest.rsplit("/", 1)[0]


def pick(arts: Artifacts, which: Which) -> str:
    """The URI to download: the merged model when there is one (auto), else the adapter."""
    if which == "all":
        return output_root(arts) + "/"
    if which == "model" or (which == "auto" and arts.merged_model):
        if not arts.merged_model:
            raise DownloadError(
                "this job writes no merged model (spec.output.mergeAdapter: false); download the adapter"
            )
        return arts.merged_model
    if not arts.adapter:
        raise DownloadError("this job has no adapter (spec.method: full); download the model")
    return arts.adapter


def verify(dest: Path, files: dict[str, Path], manifest: ArtifactManifest | None) -> int:
    """Check downloaded files (relative path under the output root -> dest/relative path) against the manifest;
    the files it lists, how many. No manifest (an output written before manifests): nothing to check."""
    if manifest is None:
        return 0
    try:
        return manifest.verify(dest, only=files)
    except ManifestMismatch as exc:
        raise DownloadError(f"{exc}; download again") from exc


@dataclass
class Downloaded:
    uri: str
    path: Path
    files: list[Path] = field(default_factory=list)
    verified: int = 0


def download(
    arts: Artifacts,
    storage: StorageSpec,
    dest: str | Path,
    which: Which = "auto",
    credentials: dict[str, str] | None = None,
) -> Downloaded:
    """Copy the chosen artifact directory under `dest` (dest/model/..., dest/adapter/...)."""
    root = output_root(arts)
    uri = pick(arts, which)
    dest = Path(dest)
    rel_dir = uri[len(root) :].strip("/")
    if root.startswith("s3://"):
        files = _download_s3(root, rel_dir, storage, dest, credentials)
        manifest = _read_s3_manifest(root + "/" + MANIFEST_FILE, storage, credentials)
    else:
        src_root = Path(root.removeprefix("file://"))
        files = _copy_local(src_root, rel_dir, dest)
        manifest = _read_local_manifest(src_root)
    if not files:
        raise DownloadError(f"nothing under {uri}: has the job succeeded?")
    verified = verify(dest, files, manifest)
    return Downloaded(
        uri=uri, path=dest / rel_dir if rel_dir else dest, files=sorted(files.values()), verified=verified
    )


REPORT_FILES = (CARD_FILE, LOSS_PLOT, EVAL_PLOT)
"""The model card and its plots, at the top of the output."""


def fetch_report(
    arts: Artifacts, storage: StorageSpec, dest: str | Path, credentials: dict[str, str] | None = None
) -> Downloaded:
    """Copy the model card (README.md) and its plots into `dest`, checked against the manifest."""
    root = output_root(arts)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if root.startswith("s3://"):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, base = split_s3(root)
        client = s3_client(storage, credentials)
        for name in REPORT_FILES:
            try:
                client.download_file(
                    bucket, "/".join(p for p in (base.strip("/"), name) if p), str(dest / name)
                )
            except ClientError:
                continue  # a card without plots (nothing to draw) is still a card
            except BotoCoreError as exc:
                raise _unreachable(f"{root}/{name}", storage, exc) from exc
            files[name] = dest / name
        manifest = _read_s3_manifest(root + "/" + MANIFEST_FILE, storage, credentials)
    else:
        src = Path(root.removeprefix("file://"))
        for name in REPORT_FILES:
            if (src / name).is_file():
                files[name] = Path(shutil.copy2(src / name, dest / name))
        manifest = _read_local_manifest(src)
    if CARD_FILE not in files:
        raise DownloadError(
            f"no {CARD_FILE} under {root}/: has the job succeeded (jobs trained before model cards have none)?"
        )
    return Downloaded(
        uri=root + "/" + CARD_FILE,
        path=dest,
        files=sorted(files.values()),
        verified=verify(dest, files, manifest),
    )


def _download_s3(
    root: str, rel_dir: str, storage: StorageSpec, dest: Path, credentials: dict[str, str] | None
) -> dict[str, Path]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, base = split_s3(root)
    base = base.strip("/")
    prefix = "/".join(p for p in (base, rel_dir) if p) + "/" if (base or rel_dir) else ""
    client = s3_client(storage, credentials)
    files: dict[str, Path] = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents") or []:
                rel = obj["Key"][len(base) + 1 :] if base else obj["Key"]
                local = dest / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, obj["Key"], str(local))
                files[rel] = local
    except (BotoCoreError, ClientError) as exc:
        raise _unreachable(f"s3://{bucket}/{prefix}", storage, exc) from exc
    return files


def _read_s3_manifest(
    uri: str, storage: StorageSpec, credentials: dict[str, str] | None
) -> ArtifactManifest | None:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    try:
        body = s3_client(storage, credentials).get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError:
        return None
    except BotoCoreError as exc:
        raise _unreachable(uri, storage, exc) from exc
    return _parse_manifest(body, uri)


def _read_local_manifest(root: Path) -> ArtifactManifest | None:
    path = root / MANIFEST_FILE
    return _parse_manifest(path.read_bytes(), str(path)) if path.exists() else None


def _parse_manifest(text: bytes, where: str) -> ArtifactManifest:
    try:
        return ArtifactManifest.parse(text)
    except ManifestMismatch as exc:
        raise DownloadError(f"{where}: {exc}") from exc


def _copy_local(src_root: Path, rel_dir: str, dest: Path) -> dict[str, Path]:
    src = src_root / rel_dir if rel_dir else src_root
    files: dict[str, Path] = {}
    if not src.is_dir():
        return files
    for p in sorted(src.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(src_root))
            local = dest / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, local)
            files[rel] = local
    return files
