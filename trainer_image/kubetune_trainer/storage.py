"""Where bytes come from and go to: local/PVC paths, S3 (boto3 transfer manager), the Hugging Face hub.

Downloads land in a node-local cache ($KUBETUNE_CACHE_DIR). A file lock (filelock) makes
the first process on a node download while the others wait, then every process reads
the same files; a `.complete` marker makes an interrupted download start over. A whole
directory moves through one s3transfer TransferManager: files in parallel, each multipart.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock
from kubetune.api.contract import ENV_CACHE_DIR, ENV_PVC_ROOT, PVC_ROOT, ExitCode
from kubetune.api.models import StorageSpec
from kubetune.api.storage import s3_client, split_s3

from kubetune_trainer.errors import TrainerError

MULTIPART_THRESHOLD = 8 * 1024 * 1024


def cache_root() -> Path:
    return Path(os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "kubetune")


def local_path(uri: str) -> Path | None:
    """The filesystem path behind a local, file:// or pvc:// URI; None for remote ones."""
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if uri.startswith("pvc://"):
        claim_and_path = uri[len("pvc://") :]
        return Path(os.environ.get(ENV_PVC_ROOT, PVC_ROOT)) / claim_and_path
    if uri.startswith("s3://") or uri.startswith("hf://"):
        return None
    return Path(uri)


# ---------------------------------------------------------------------- S3
# split_s3 and s3_client (credentials from the environment, which the operator fills from the job's Secret,
# or IRSA) are kubetune.api.storage's, shared with the SDK.


def transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD, max_concurrency=8)


def download_all(client: Any, bucket: str, files: list[tuple[str, Path]]) -> None:
    """Each (key, path) downloaded by one TransferManager; the first failure is raised."""
    from boto3.s3.transfer import create_transfer_manager

    with create_transfer_manager(client, transfer_config()) as manager:
        futures = []
        for key, out in files:
            out.parent.mkdir(parents=True, exist_ok=True)
            futures.append(manager.download(bucket, key, str(out)))
        for future in futures:
            future.result()


def upload_all(client: Any, bucket: str, files: list[tuple[Path, str]]) -> None:
    """Each (path, key) uploaded by one TransferManager; the first failure is raised."""
    from boto3.s3.transfer import create_transfer_manager

    with create_transfer_manager(client, transfer_config()) as manager:
        futures = [manager.upload(str(src), bucket, key) for src, key in files]
        for future in futures:
            future.result()


def classify_s3_error(exc: BaseException, what: str, not_found: ExitCode) -> TrainerError:
    """Map boto errors to the contract: missing objects are the user's, unreachable stores are infrastructure."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return TrainerError(ExitCode.CREDENTIALS_INVALID, f"{what}: no S3 credentials; set spec.storage.secretRef")
    if isinstance(exc, EndpointConnectionError):
        return TrainerError(ExitCode.STORAGE_UNAVAILABLE, f"{what}: cannot reach the S3 endpoint: {exc}")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken"}:
            return TrainerError(
                ExitCode.CREDENTIALS_INVALID, f"{what}: S3 refused the credentials ({code}); check spec.storage.secretRef"
            )
        if code in {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}:
            return TrainerError(not_found, f"{what}: not found in S3 ({code})")
        if code.startswith("5") or code in {"SlowDown", "ServiceUnavailable", "InternalError"}:
            return TrainerError(ExitCode.STORAGE_UNAVAILABLE, f"{what}: S3 error {code}")
        return TrainerError(not_found, f"{what}: S3 error {code}: {exc}")
    return TrainerError(ExitCode.STORAGE_UNAVAILABLE, f"{what}: {exc}")


def s3_list(client, bucket: str, prefix: str) -> list[str]:  # type: ignore[no-untyped-def]
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


# ------------------------------------------------------------ node-local cache


def cached(key: str, fill: Callable[[Path], None]) -> Path:
    """Run `fill(dir)` once per node for `key`; everyone else waits on the lock and reuses the result."""
    target = cache_root() / hashlib.sha256(key.encode()).hexdigest()[:24]
    marker = target / ".complete"
    if marker.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.with_suffix(".lock"))):
        if not marker.exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            fill(target)
            marker.write_text(key)
    return target


def download_s3_prefix(storage: StorageSpec, uri: str, dest: Path, not_found: ExitCode, what: str) -> None:
    client = s3_client(storage)
    bucket, prefix = split_s3(uri)
    try:
        keys = s3_list(client, bucket, prefix)
        # An exact object, or everything under prefix/.
        if prefix and prefix in keys:
            keys, base = [prefix], prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        else:
            base = prefix.rstrip("/")
            keys = [k for k in keys if not base or k.startswith(base + "/")]
        if not keys:
            raise TrainerError(not_found, f"{what}: nothing at {uri}")
        download_all(client, bucket, [(key, dest / (key[len(base) :].lstrip("/") if base else key)) for key in keys])
    except TrainerError:
        raise
    except Exception as exc:
        raise classify_s3_error(exc, what, not_found) from exc


def classify_hub_error(exc: BaseException, not_found: ExitCode) -> tuple[ExitCode, str]:
    """A hub failure -> (exit code, what to do). A missing repo, revision or file is the user's to fix;
    a gated repo needs a token; an unreachable hub or a server error may pass, so a restart can help."""
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return ExitCode.CREDENTIALS_INVALID, "the repo is gated: accept its terms and give the pods HF_TOKEN (spec.env from a Secret)"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return not_found, "no such repo, or it is private and HF_TOKEN is missing"
    if isinstance(exc, errors.RevisionNotFoundError):
        return not_found, "no such revision: fix spec.model.revision"
    if isinstance(exc, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
        return ExitCode.STORAGE_UNAVAILABLE, "the hub could not be reached (HF_ENDPOINT, proxy, network policy)"
    if isinstance(exc, errors.EntryNotFoundError):
        return not_found, "a file the repo lists is missing"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return ExitCode.CREDENTIALS_INVALID, "the hub refused the token: check HF_TOKEN"
    return ExitCode.STORAGE_UNAVAILABLE, "hub error"


def fetch(uri: str, storage: StorageSpec, what: str, not_found: ExitCode, revision: str | None = None, repo_type: str = "model") -> Path:
    """A local path holding what `uri` names (a file or a directory); remote sources are cached per node.
    `hf://` names a model repository, or a dataset repository when `repo_type` is "dataset"
    (`hf://datasets/org/name` and `hf://org/name` both)."""
    path = local_path(uri)
    if path is not None:
        if not path.exists():
            raise TrainerError(not_found, f"{what}: {uri} does not exist (looked at {path})")
        return path
    if uri.startswith("s3://"):
        directory = cached(f"{uri}@{storage.endpoint}", lambda d: download_s3_prefix(storage, uri, d, not_found, what))
        bucket, prefix = split_s3(uri)
        single = directory / prefix.rsplit("/", 1)[-1]
        return single if prefix and single.is_file() else directory
    if uri.startswith("hf://"):
        repo = uri[len("hf://") :]
        if repo_type == "dataset":
            repo = repo.removeprefix("datasets/")

        def fill(directory: Path) -> None:
            try:
                from huggingface_hub import snapshot_download

                snapshot_download(repo, revision=revision, local_dir=str(directory), repo_type=repo_type)
            except Exception as exc:
                code, hint = classify_hub_error(exc, not_found)
                raise TrainerError(code, f"{what}: cannot fetch {uri} (revision {revision or 'main'}) from the Hugging Face hub: {hint}: {type(exc).__name__}: {exc}") from exc

        return cached(f"{uri}@{revision}" + (":dataset" if repo_type == "dataset" else ""), fill)
    raise TrainerError(ExitCode.CONFIG_INVALID, f"{what}: unsupported URI {uri}")


# ----------------------------------------------------------------- output


class OutputStore:
    """The artifacts prefix: a local directory or an S3 prefix, addressed by relative paths."""

    def __init__(self, uri: str, storage: StorageSpec):
        self.uri = uri.rstrip("/")
        self.storage = storage
        self.local = local_path(self.uri)
        self.client: Any = None
        if self.local is None:
            if not self.uri.startswith("s3://"):
                raise TrainerError(ExitCode.CONFIG_INVALID, f"spec.output.uri: unsupported URI {uri}")
            self.client = s3_client(storage)
            self.bucket, self.prefix = split_s3(self.uri)

    def url(self, rel: str) -> str:
        return f"{self.uri}/{rel}"

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _s3(self, action: str, fn):  # type: ignore[no-untyped-def]
        try:
            return fn()
        except Exception as exc:
            raise classify_s3_error(exc, f"output {self.uri}: {action}", ExitCode.STORAGE_UNAVAILABLE) from exc

    def check_writable(self) -> None:
        self.put_text(".kubetune-write-check", "ok")

    def put_files(self, files: list[tuple[Path, str]]) -> None:
        """Each (local file, relative path) written; on S3, all through one TransferManager."""
        if self.local is not None:
            for src, rel in files:
                out = self.local / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, out)
            return
        what = f"upload {len(files)} file(s) under {files[0][1].rsplit('/', 1)[0] if files else ''}"
        self._s3(what, lambda: upload_all(self.client, self.bucket, [(src, self._key(rel)) for src, rel in files]))

    def put_text(self, rel: str, text: str) -> None:
        if self.local is not None:
            out = self.local / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
        else:
            self._s3(f"write {rel}", lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=text.encode()))

    def exists(self, rel: str) -> bool:
        if self.local is not None:
            return (self.local / rel).exists()
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise classify_s3_error(exc, f"output {self.uri}", ExitCode.STORAGE_UNAVAILABLE) from exc

    def list_dirs(self, rel: str) -> list[str]:
        """Names directly under rel/."""
        if self.local is not None:
            base = self.local / rel
            return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.exists() else []
        prefix = self._key(rel).rstrip("/") + "/"
        keys = self._s3("list", lambda: s3_list(self.client, self.bucket, prefix))
        return sorted({k[len(prefix) :].split("/", 1)[0] for k in keys if "/" in k[len(prefix) :]})

    def get_dir(self, rel: str, dest: Path) -> None:
        if self.local is not None:
            shutil.copytree(self.local / rel, dest, dirs_exist_ok=True)
            return
        prefix = self._key(rel).rstrip("/") + "/"

        def download() -> None:
            keys = s3_list(self.client, self.bucket, prefix)
            download_all(self.client, self.bucket, [(key, dest / key[len(prefix) :]) for key in keys])

        self._s3(f"download {rel}", download)

    def delete_dir(self, rel: str) -> None:
        if self.local is not None:
            shutil.rmtree(self.local / rel, ignore_errors=True)
            return
        prefix = self._key(rel).rstrip("/") + "/"

        def delete() -> None:
            keys = s3_list(self.client, self.bucket, prefix)
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]}
                )

        self._s3(f"delete {rel}", delete)
