"""Where bytes come from and go to: local/PVC paths, S3 (boto3 transfer manager), the Hugging Face hub.

Downloads land in a node-local cache ($KUBETUNE_CACHE_DIR), keyed by what the bytes are, not
where they were: S3 by each object's ETag (and version id where the bucket keeps versions),
`hf://` by the commit the revision resolves to. An object replaced at the same URI is fetched
again. Local files are identified by size, mtime_ns, ctime_ns, inode and a sampled sha256
(`local_identity`: ~1 ms a file, where a full sha256 costs 2.6 s per GiB on this project's CI
machine; any rewrite moves ctime, which no user call can set back). Each identity is recorded
(with the local path it was fetched to: metrics.json `lineage`, kubetune_trainer.lineage).

A file lock (filelock) makes the first process on a node download while the others wait, then
every process reads the same files; a `.complete` marker makes an interrupted download start
over. A whole directory moves through one s3transfer TransferManager: files in parallel, each
multipart.
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
SAMPLES, SAMPLE_BYTES = (
    16,
    64 * 1024,
)  # local_identity: blocks hashed per file, evenly spaced, first and last included

IDENTITIES: dict[str, str] = {}  # every input fetched by this process -> its identity (metrics.json lineage)
FETCHED: dict[str, Path] = {}  # every input fetched by this process -> the local path of those bytes


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

    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD, max_concurrency=8
    )


def download_all(
    client: Any, bucket: str, files: list[tuple[str, Path]], versions: dict[str, str] | None = None
) -> None:
    """Each (key, path) downloaded by one TransferManager (the version named in `versions`, when given);
    the first failure is raised."""
    from boto3.s3.transfer import create_transfer_manager

    with create_transfer_manager(client, transfer_config()) as manager:
        futures = []
        for key, out in files:
            out.parent.mkdir(parents=True, exist_ok=True)
            extra = {"VersionId": versions[key]} if versions and key in versions else None
            futures.append(manager.download(bucket, key, str(out), extra_args=extra))
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
        return TrainerError(
            ExitCode.CREDENTIALS_INVALID, f"{what}: no S3 credentials; set spec.storage.secretRef"
        )
    if isinstance(exc, EndpointConnectionError):
        return TrainerError(ExitCode.STORAGE_UNAVAILABLE, f"{what}: cannot reach the S3 endpoint: {exc}")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken"}:
            return TrainerError(
                ExitCode.CREDENTIALS_INVALID,
                f"{what}: S3 refused the credentials ({code}); check spec.storage.secretRef",
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


def local_identity(path: Path) -> str:
    """A local file's or directory's identity: per file its relative path, size, mtime_ns, ctime_ns, inode and
    the sha256 of SAMPLES blocks of SAMPLE_BYTES (all of a file up to 1 MiB). A rewrite changes ctime even
    when size and mtime are put back; a copy changes the inode. Cheap enough to run on every rank at start."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        st = f.stat()
        h.update(
            f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}".encode()
        )
        with open(f, "rb") as handle:
            if st.st_size <= SAMPLES * SAMPLE_BYTES:
                h.update(handle.read())
            else:
                for i in range(SAMPLES):
                    handle.seek(i * (st.st_size - SAMPLE_BYTES) // (SAMPLES - 1))
                    h.update(handle.read(SAMPLE_BYTES))
    return "local:" + h.hexdigest()[:32]


def s3_objects(client: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    """The objects under prefix as listed (Key, ETag, Size), each with its VersionId when the bucket keeps versions."""
    from botocore.exceptions import ClientError

    try:
        versioned = client.get_bucket_versioning(Bucket=bucket).get("Status") == "Enabled"
    except ClientError:  # not allowed to ask: ETags alone identify the content
        versioned = False
    objects: list[dict[str, Any]] = []
    if versioned:
        for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
            objects += [{"Key": v["Key"], "ETag": v["ETag"], "Size": v["Size"], "VersionId": v["VersionId"]}
                        for v in page.get("Versions", []) if v.get("IsLatest")]  # fmt: skip
        return objects
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        objects += [{"Key": o["Key"], "ETag": o["ETag"], "Size": o["Size"]} for o in page.get("Contents", [])]
    return objects


def s3_selection(objects: list[dict[str, Any]], prefix: str) -> tuple[list[dict[str, Any]], str]:
    """An exact object, or everything under prefix/; and the base the local paths are relative to."""
    if prefix and any(o["Key"] == prefix for o in objects):
        return [o for o in objects if o["Key"] == prefix], prefix.rsplit("/", 1)[0] if "/" in prefix else ""
    base = prefix.rstrip("/")
    return [o for o in objects if not base or o["Key"].startswith(base + "/")], base


def s3_identity(objects: list[dict[str, Any]]) -> str:
    """One identity for the objects: their keys, ETags, sizes and version ids."""
    rows = sorted(f"{o['Key']}:{o['ETag']}:{o['Size']}:{o.get('VersionId', '')}" for o in objects)
    if len(rows) == 1:
        o = objects[0]
        return f"etag:{o['ETag'].strip(chr(34))}" + (f"@{o['VersionId']}" if o.get("VersionId") else "")
    return "etags:" + hashlib.sha256("\n".join(rows).encode()).hexdigest()[:32]


def download_s3_prefix(storage: StorageSpec, uri: str, what: str, not_found: ExitCode) -> Path:
    """The objects at `uri` in the node-local cache, keyed by their identity: replaced objects are fetched again.
    When the bucket keeps no versions and an object changes while it downloads, the run stops (a restart fetches it)."""
    client = s3_client(storage)
    bucket, prefix = split_s3(uri)
    try:
        objects, base = s3_selection(s3_objects(client, bucket, prefix), prefix)
        if not objects:
            raise TrainerError(not_found, f"{what}: nothing at {uri}")
        identity = s3_identity(objects)

        def fill(dest: Path) -> None:
            versions = {o["Key"]: o["VersionId"] for o in objects if o.get("VersionId")}
            download_all(
                client,
                bucket,
                [
                    (o["Key"], dest / (o["Key"][len(base) :].lstrip("/") if base else o["Key"]))
                    for o in objects
                ],
                versions,
            )
            if (
                not versions
                and s3_identity(s3_selection(s3_objects(client, bucket, prefix), prefix)[0]) != identity
            ):
                raise TrainerError(
                    ExitCode.STORAGE_UNAVAILABLE,
                    f"{what}: {uri} changed while it was downloading; a restart fetches it again",
                )

        directory = cached(f"{uri}@{storage.endpoint}#{identity}", fill)
    except TrainerError:
        raise
    except Exception as exc:
        raise classify_s3_error(exc, what, not_found) from exc
    IDENTITIES[uri] = identity
    return directory


def classify_hub_error(exc: BaseException, not_found: ExitCode) -> tuple[ExitCode, str]:
    """A hub failure -> (exit code, what to do). A missing repo, revision or file is the user's to fix;
    a gated repo needs a token; an unreachable hub or a server error may pass, so a restart can help."""
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return (
            ExitCode.CREDENTIALS_INVALID,
            "the repo is gated: accept its terms and give the pods HF_TOKEN (spec.env from a Secret)",
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return not_found, "no such repo, or it is private and HF_TOKEN is missing"
    if isinstance(exc, errors.RevisionNotFoundError):
        return not_found, "no such revision: fix spec.model.revision"
    if isinstance(exc, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
        return (
            ExitCode.STORAGE_UNAVAILABLE,
            "the hub could not be reached (HF_ENDPOINT, proxy, network policy)",
        )
    if isinstance(exc, errors.EntryNotFoundError):
        return not_found, "a file the repo lists is missing"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return ExitCode.CREDENTIALS_INVALID, "the hub refused the token: check HF_TOKEN"
    return ExitCode.STORAGE_UNAVAILABLE, "hub error"


def fetch(
    uri: str,
    storage: StorageSpec,
    what: str,
    not_found: ExitCode,
    revision: str | None = None,
    repo_type: str = "model",
) -> Path:
    """A local path holding what `uri` names (a file or a directory); remote sources are cached per node by
    content identity (module docstring), which IDENTITIES records. `hf://` names a model repository, or a
    dataset repository when `repo_type` is "dataset" (`hf://datasets/org/name` and `hf://org/name` both)."""
    path = local_path(uri)
    if path is not None:
        if not path.exists():
            raise TrainerError(not_found, f"{what}: {uri} does not exist (looked at {path})")
        IDENTITIES[uri], FETCHED[uri] = local_identity(path), path
        return path
    if uri.startswith("s3://"):
        directory = download_s3_prefix(storage, uri, what, not_found)
        bucket, prefix = split_s3(uri)
        single = directory / prefix.rsplit("/", 1)[-1]
        FETCHED[uri] = single if prefix and single.is_file() else directory
        return FETCHED[uri]
    if uri.startswith("hf://"):
        return fetch_hub(uri, what, not_found, revision, repo_type)
    raise TrainerError(ExitCode.CONFIG_INVALID, f"{what}: unsupported URI {uri}")


def fetch_hub(uri: str, what: str, not_found: ExitCode, revision: str | None, repo_type: str) -> Path:
    """The snapshot of an `hf://` repository at the commit `revision` names now, in the node cache under that commit."""
    repo = uri[len("hf://") :]
    if repo_type == "dataset":
        repo = repo.removeprefix("datasets/")
    commit = hub_commit(repo, revision, repo_type, uri, what, not_found)

    def fill(directory: Path) -> None:
        try:
            from huggingface_hub import snapshot_download

            snapshot_download(repo, revision=commit, local_dir=str(directory), repo_type=repo_type)
        except Exception as exc:
            code, hint = classify_hub_error(exc, not_found)
            raise TrainerError(
                code,
                f"{what}: cannot fetch {uri} (revision {revision or 'main'}) from the Hugging Face hub: {hint}: {type(exc).__name__}: {exc}",
            ) from exc

    directory = cached(f"{uri}@{commit}" + (":dataset" if repo_type == "dataset" else ""), fill)
    IDENTITIES[uri], FETCHED[uri] = f"commit:{commit}", directory
    return directory


def hub_commit(
    repo: str, revision: str | None, repo_type: str, uri: str, what: str, not_found: ExitCode
) -> str:
    """The commit sha `revision` (a branch, tag or sha; main when unset) names now: the cache key of a hub download."""
    try:
        from huggingface_hub import HfApi

        sha = HfApi().repo_info(repo, revision=revision, repo_type=repo_type).sha
    except Exception as exc:
        code, hint = classify_hub_error(exc, not_found)
        raise TrainerError(
            code,
            f"{what}: cannot resolve {uri} (revision {revision or 'main'}) on the Hugging Face hub: {hint}: {type(exc).__name__}: {exc}",
        ) from exc
    if not sha:
        raise TrainerError(
            ExitCode.STORAGE_UNAVAILABLE,
            f"{what}: the hub named no commit for {uri} (revision {revision or 'main'})",
        )
    return str(sha)


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
            raise classify_s3_error(
                exc, f"output {self.uri}: {action}", ExitCode.STORAGE_UNAVAILABLE
            ) from exc

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
        self._s3(
            what, lambda: upload_all(self.client, self.bucket, [(src, self._key(rel)) for src, rel in files])
        )

    def put_text(self, rel: str, text: str) -> None:
        if self.local is not None:
            out = self.local / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
        else:
            self._s3(
                f"write {rel}",
                lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=text.encode()),
            )

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

    def get_text(self, rel: str) -> str | None:
        """The text of rel, or None when there is no such file."""
        if self.local is not None:
            path = self.local / rel
            return path.read_text(errors="replace") if path.is_file() else None
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise classify_s3_error(
                exc, f"output {self.uri}: read {rel}", ExitCode.STORAGE_UNAVAILABLE
            ) from exc
        except Exception as exc:
            raise classify_s3_error(
                exc, f"output {self.uri}: read {rel}", ExitCode.STORAGE_UNAVAILABLE
            ) from exc
        return bytes(body).decode(errors="replace")

    def put_text_if_absent(self, rel: str, text: str) -> bool:
        """Write rel only when nothing is there (O_EXCL locally; If-None-Match on S3): whether this call wrote it.
        A store that ignores the condition is caught by the caller reading the file back."""
        if self.local is not None:
            out = self.local / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(out, "x") as handle:
                    handle.write(text)
            except FileExistsError:
                return False
            return True
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(rel), Body=text.encode(), IfNoneMatch="*"
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in {"PreconditionFailed", "412", "ConditionalRequestConflict"}:
                return False
            if code in {"NotImplemented", "501"}:  # a store without conditional writes: look, then write
                if self.exists(rel):
                    return False
                self.put_text(rel, text)
                return True
            raise classify_s3_error(
                exc, f"output {self.uri}: write {rel}", ExitCode.STORAGE_UNAVAILABLE
            ) from exc
        except Exception as exc:
            raise classify_s3_error(
                exc, f"output {self.uri}: write {rel}", ExitCode.STORAGE_UNAVAILABLE
            ) from exc
        return True

    def move_dir(self, rel: str, new_rel: str, first: str | None = None) -> None:
        """Rename rel/ to new_rel/ (nothing is deleted that was not copied first). On S3 every object is
        copied, then the originals deleted, `first` (a marker such as COMPLETE) before the others."""
        if self.local is not None:
            os.replace(self.local / rel, self.local / new_rel)
            return
        prefix, new_prefix = self._key(rel).rstrip("/") + "/", self._key(new_rel).rstrip("/") + "/"

        def move() -> None:
            keys = s3_list(self.client, self.bucket, prefix)
            for key in keys:
                self.client.copy(
                    {"Bucket": self.bucket, "Key": key}, self.bucket, new_prefix + key[len(prefix) :]
                )
            ordered = sorted(keys, key=lambda k: k != prefix + (first or ""))
            for key in ordered:
                self.client.delete_object(Bucket=self.bucket, Key=key)

        self._s3(f"move {rel} to {new_rel}", move)

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
