"""spec.output.publish.oci: the finished model as an OCI artifact, with the CNCF ModelPack media types.

Every file is one layer, raw (uncompressed, as ModelPack asks for weights), so a layer's digest is the
file's sha256: the same one manifest.json records under spec.output.uri. The config blob is ModelPack's
model config. Nothing in the artifact depends on the clock, so pushing the same files again gives the same
manifest digest. The client is oras-py; credentials come from a mounted dockerconfigjson file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.contract import ExitCode, FileEntry
from kubetune.api.models import PublishSpec

from kubetune_trainer.errors import TrainerError

# github.com/modelpack/model-spec specs-go/v1 (mediatype.go, annotations.go)
ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.cncf.model.config.v1+json"
WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG_RAW = "application/vnd.cncf.model.weight.config.v1.raw"
DOC_RAW = "application/vnd.cncf.model.doc.v1.raw"
ANNOTATION_FILEPATH = "org.cncf.model.filepath"
ANNOTATION_TITLE = "org.opencontainers.image.title"  # what `oras pull` names the file
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
DOC_NAMES = ("README.md", "LICENSE", "LICENSE.txt", "NOTICE")
DOC_SUFFIXES = (".md", ".png")  # the model card and its plots
CHUNKED_ABOVE = 256 << 20  # bigger files go up in chunks rather than read into memory whole
CHUNK = 64 << 20


def media_type(rel: str) -> str:
    name = rel.rsplit("/", 1)[-1]
    if name.endswith(WEIGHT_SUFFIXES):
        return WEIGHT_RAW
    if name in DOC_NAMES or name.endswith(DOC_SUFFIXES):
        return DOC_RAW
    return WEIGHT_CONFIG_RAW  # config.json, tokenizer files, adapter_config.json, chat template


@dataclass(frozen=True)
class Layer:
    path: Path
    rel: str  # path inside the pushed directory
    sha256: str
    size: int

    def descriptor(self) -> dict[str, Any]:
        return {
            "mediaType": media_type(self.rel),
            "digest": f"sha256:{self.sha256}",
            "size": self.size,
            "annotations": {ANNOTATION_TITLE: self.rel, ANNOTATION_FILEPATH: self.rel},
        }


def layers(directory: Path, files: Mapping[str, FileEntry], prefix: str) -> list[Layer]:
    """The files under `prefix/` of a manifest.json file table (ArtifactManifest.files), in path order."""
    return [
        Layer(directory / rel, rel[len(prefix) + 1 :], entry.sha256, entry.size)
        for rel, entry in sorted(files.items())
        if rel.startswith(prefix + "/")
    ]


def with_card(
    parts: list[Layer], directory: Path, files: Mapping[str, FileEntry], card: list[str]
) -> list[Layer]:
    """`parts` plus the top-level model card files (README.md, plots) as doc layers, where the pushed
    directory has no file of that name (peft writes its own README.md into adapter/: that one stays)."""
    taken = {layer.rel for layer in parts}
    extra = [
        Layer(directory / n, n, files[n].sha256, files[n].size) for n in card if n in files and n not in taken
    ]
    return parts + extra


def model_config(parts: list[Layer], name: str) -> dict[str, Any]:
    """ModelPack's model config (config.md): descriptor, modelfs, config; read from the files' config.json."""
    found = {layer.rel: layer.path for layer in parts}
    hf = json.loads(found["config.json"].read_text()) if "config.json" in found else {}
    config: dict[str, Any] = {"architecture": "transformer", "format": "safetensors"}
    if precision := hf.get("dtype") or hf.get("torch_dtype"):
        config["precision"] = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(
            precision, precision
        )
    descriptor: dict[str, Any] = {"name": name}
    if family := hf.get("model_type"):
        descriptor["family"] = family
    return {
        "descriptor": descriptor,
        "modelfs": {"type": "layers", "diffIds": [f"sha256:{layer.sha256}" for layer in parts]},
        "config": config,
    }


def manifest(
    parts: list[Layer], config_blob: bytes, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    """The OCI image manifest; `annotations` (the lineage: kubetune_trainer.lineage.oci_annotations) on the manifest."""
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {
            "mediaType": CONFIG_MEDIA_TYPE,
            "digest": f"sha256:{hashlib.sha256(config_blob).hexdigest()}",
            "size": len(config_blob),
        },
        "layers": [layer.descriptor() for layer in parts],
    }
    if annotations:
        body["annotations"] = dict(sorted(annotations.items()))
    return body


def split_reference(reference: str | None) -> tuple[str, str, str]:
    """registry/repository:tag -> (registry, repository, tag)."""
    registry, _, rest = (reference or "").partition("/")
    repository, _, tag = rest.rpartition(":")
    return registry, repository, tag


def registry_credentials(auth_file: Path, registry: str, secret: str) -> tuple[str, str]:
    """(user, password) for `registry` from a dockerconfigjson file; a one-line error naming the Secret."""
    fix = f"spec.output.publish.credentialsSecret {secret!r}"
    try:
        auths = json.loads(auth_file.read_text()).get("auths") or {}
    except (OSError, ValueError, AttributeError) as exc:
        raise TrainerError(ExitCode.CREDENTIALS_INVALID, f"{fix}: not a dockerconfigjson ({type(exc).__name__}); "
                           "create it with kubectl create secret docker-registry") from None  # fmt: skip
    for server, entry in auths.items():
        host = server.split("://", 1)[-1].split("/", 1)[0]
        if host != registry or not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            return user, password
        if entry.get("username"):
            return entry["username"], entry.get("password", "")
    raise TrainerError(
        ExitCode.CREDENTIALS_INVALID,
        f"{fix} has no auths entry for {registry} (it has {sorted(auths) or 'none'}); "
        f"recreate it with kubectl create secret docker-registry {secret} --docker-server={registry} ...",
    )


def _client(spec: PublishSpec, auth_file: Path | None) -> Any:
    import oras.auth
    import oras.provider
    import requests

    class ChallengeAuth(oras.auth.TokenAuth):  # type: ignore[misc]
        """oras-py picks Basic or token auth up front; registries say which in their challenge."""

        def authenticate_request(
            self, original: requests.Response, headers: dict[str, str], refresh: bool = False
        ) -> Any:
            challenge = original.headers.get("Www-Authenticate", "")
            if not getattr(self, "_basic_auth", None):
                raise oras.auth.AuthenticationException(
                    f"the registry asks for credentials ({challenge or original.status_code})"
                )
            if challenge.lower().startswith("basic"):
                self.session.headers["Authorization"] = f"Basic {self._basic_auth}"  # every later request too
                return {**(headers or {}), "Authorization": f"Basic {self._basic_auth}"}, True
            # A token is scoped (pull, then push): a challenge means the one held does not cover this request,
            # so always ask for a new one for the challenged scope (oras-py would resend the old one).
            out, changed = super().authenticate_request(original, headers, refresh=True)
            if not changed:  # the token service refused: say so at once rather than retry for minutes
                raise oras.auth.AuthenticationException(
                    f"the token service refused the credentials ({challenge})"
                )
            return out, changed

    client = oras.provider.Registry(insecure=spec.plain_http)
    auth = ChallengeAuth()
    auth.session, auth.prefix, auth._tls_verify = client.session, client.prefix, True
    client.auth = auth
    registry = split_reference(spec.oci)[0]
    if auth_file is not None and spec.credentials_secret:
        auth.set_basic_auth(*registry_credentials(auth_file, registry, spec.credentials_secret))
    return client


def _refused(spec: PublishSpec, registry: str, detail: str) -> TrainerError:
    where = (
        f"credentials in Secret {spec.credentials_secret!r}" if spec.credentials_secret else "no credentials"
    )
    fix = (
        "fix the Secret's auths entry"
        if spec.credentials_secret
        else "set spec.output.publish.credentialsSecret"
    )
    return TrainerError(
        ExitCode.CREDENTIALS_INVALID,
        f"spec.output.publish: registry {registry} refused {where} ({detail}); {fix}",
    )


def _check(spec: PublishSpec, response: Any, what: str) -> None:
    code = response.status_code
    if code in (200, 201, 202):
        return
    registry = split_reference(spec.oci)[0]
    if code in (401, 403):
        raise _refused(spec, registry, f"{code} {response.reason} on {what}")
    try:
        errors = "; ".join(e.get("message", "") for e in response.json().get("errors", []))
    except ValueError:
        errors = ""
    detail = f"{code} {response.reason} on {what}{': ' + errors if errors else ''}"
    if code >= 500:
        raise TrainerError(ExitCode.INFRASTRUCTURE, f"spec.output.publish: registry {registry}: {detail}")
    raise TrainerError(
        ExitCode.CONFIG_INVALID, f"spec.output.publish.oci {spec.oci}: the registry refused it ({detail})"
    )


@contextmanager
def _errors(spec: PublishSpec) -> Iterator[None]:
    """oras-py and requests exceptions -> TrainerError, one line, never the credentials."""
    import oras.auth
    import requests

    registry = split_reference(spec.oci)[0]
    try:
        yield
    except oras.auth.AuthenticationException as exc:
        raise _refused(spec, registry, str(exc)) from None
    except requests.exceptions.SSLError as exc:
        raise TrainerError(ExitCode.CONFIG_INVALID, f"spec.output.publish: TLS to {registry} failed ({type(exc).__name__}); "
                           "use a certificate the pod trusts, or plainHTTP: true for a plain-HTTP registry") from None  # fmt: skip
    except requests.exceptions.RequestException as exc:
        raise TrainerError(
            ExitCode.INFRASTRUCTURE,
            f"spec.output.publish: registry {registry} unreachable ({type(exc).__name__})",
        ) from None


def check_access(spec: PublishSpec, auth_file: Path | None) -> None:
    """Before training: do the credentials open the repository? (A HEAD of a blob; nothing is written.)"""
    registry, repository, _ = split_reference(spec.oci)
    with _errors(spec):
        client = _client(spec, auth_file)
        container = client.get_container(spec.oci)
        empty = "sha256:" + hashlib.sha256(b"{}").hexdigest()
        response = client.do_request(f"{client.prefix}://{container.get_blob_url(empty)}", "HEAD")
        if response.status_code not in (200, 404):
            _check(spec, response, f"{repository}")


def push(
    spec: PublishSpec, parts: list[Layer], auth_file: Path | None, annotations: dict[str, str] | None = None
) -> str:
    """Push the layers and the config, then the manifest under the tag; the digest-pinned reference."""
    assert spec.oci is not None
    registry, repository, _tag = split_reference(spec.oci)
    config_blob = json.dumps(model_config(parts, repository.rsplit("/", 1)[-1]), sort_keys=True).encode()
    body = manifest(parts, config_blob, annotations)
    with _errors(spec), tempfile.TemporaryDirectory(prefix="kubetune-oci-") as tmp:
        client = _client(spec, auth_file)
        container = client.get_container(spec.oci)
        for layer, descriptor in zip(parts, body["layers"], strict=True):
            big = layer.size > CHUNKED_ABOVE
            response = client.upload_blob(
                str(layer.path), container, descriptor, do_chunked=big, chunk_size=CHUNK
            )
            _check(spec, response, f"blob {layer.rel}")
        config_file = Path(tmp) / "config.json"
        config_file.write_bytes(config_blob)
        _check(spec, client.upload_blob(str(config_file), container, body["config"]), "the config blob")
        response = client.upload_manifest(body, container)
        _check(spec, response, "the manifest")
    digest = response.headers.get("Docker-Content-Digest") or ""
    if not digest.startswith("sha256:"):
        raise TrainerError(
            ExitCode.INFRASTRUCTURE, f"spec.output.publish: {registry} returned no manifest digest"
        )
    return f"{registry}/{repository}@{digest}"
