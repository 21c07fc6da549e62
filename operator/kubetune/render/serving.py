"""spec.serving -> the object that serves a succeeded job's model. Pure: plain dicts in, plain dicts out.

- `InferenceService` (KServe serving.kserve.io/v1beta1): modelFormat huggingface (KServe's Hugging Face
  server, which runs vLLM where it can). Merged weights: `storageUri` at them, or at the OCI artifact
  when the job published one. A LoRA adapter: `storageUris` mounts the base model and the adapter under
  /mnt/models, and vLLM gets `--enable-lora --lora-modules <name>=<adapter dir>`.
- `Deployment` (apps/v1): the user's serving image with the model's location in its environment
  (KUBETUNE_MODEL_URI, ...) and the job's S3 settings, so `args: ["--model", "$(KUBETUNE_MODEL_URI)"]` works.

The served object and its pods carry `kubetune.io/serving: <job>`, never `kubetune.io/job-name`: KServe
copies an InferenceService's labels onto its pods, and the operator counts pods with the job label as
the job's own gang.
"""

from __future__ import annotations

from typing import Any, Final

from kubetune.api import methods
from kubetune.api.models import FineTuneJobSpec
from kubetune.api.names import ANNOTATION_MODEL, APP_SERVING, LABEL_ROLE, LABEL_SERVING, standard_labels
from kubetune.render.objects import container_resources, storage_env, user_env

KSERVE_GROUP: Final = "serving.kserve.io"
KSERVE_VERSION: Final = "v1beta1"
KSERVE_PLURAL: Final = "inferenceservices"
MODELS_DIR: Final = "/mnt/models"  # where KServe's storage initializer puts what it downloads
BASE_DIR: Final = f"{MODELS_DIR}/base"
ADAPTER_DIR: Final = f"{MODELS_DIR}/adapter"
CONTAINER: Final = "server"

ENV_MODEL_URI: Final = "KUBETUNE_MODEL_URI"
ENV_BASE_MODEL_URI: Final = "KUBETUNE_BASE_MODEL_URI"
ENV_ADAPTER_URI: Final = "KUBETUNE_ADAPTER_URI"
ENV_MODEL_NAME: Final = "KUBETUNE_SERVED_MODEL_NAME"
ENV_PORT: Final = "KUBETUNE_SERVING_PORT"


def serving_name(spec: FineTuneJobSpec, job: str) -> str:
    return (spec.serving.name if spec.serving is not None else None) or job


def serving_labels(job: str) -> dict[str, str]:
    return {**standard_labels(job, "serving", APP_SERVING), LABEL_SERVING: job, LABEL_ROLE: "serving"}


def oci_uri(artifacts: dict[str, Any]) -> str | None:
    """The published OCI artifact (status.artifacts.oci) as a KServe storage URI (`oci://registry/repo@sha256:...`)."""
    ref = artifacts.get("oci")
    if not ref:
        return None
    return ref if str(ref).startswith("oci://") else f"oci://{ref}"


def _published_model(spec: FineTuneJobSpec) -> bool:
    """Whether output.publish pushed the full weights (not the adapter alone)."""
    return methods.published_artifact(spec) == "model"


def base_model_uri(spec: FineTuneJobSpec) -> str:
    """spec.model.source as KServe's storage initializer reads it (`hf://org/name:revision`)."""
    source = spec.model.source.rstrip("/")
    if source.startswith("hf://") and spec.model.revision:
        return f"{source}:{spec.model.revision}"
    return source


def model_uris(spec: FineTuneJobSpec, artifacts: dict[str, Any]) -> dict[str, str]:
    """{"model": ...} for merged weights; {"base": ..., "adapter": ...} for an adapter. `artifacts` is
    status.artifacts as written (camelCase)."""
    if methods.served_artifact(spec) == "adapter":  # from S3: KServe mounts oci:// only as the one storageUri
        return {"base": base_model_uri(spec), "adapter": str(artifacts.get("adapter") or "").rstrip("/")}
    oci = oci_uri(artifacts)
    if oci and _published_model(spec):
        return {"model": oci}
    return {"model": str(artifacts.get("mergedModel") or "").rstrip("/")}


def served_uri(uris: dict[str, str]) -> str:
    return uris.get("model") or uris["adapter"]


def _metadata(name: str, namespace: str, job: str, uri: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": serving_labels(job),
        "annotations": {ANNOTATION_MODEL: uri},
    }


def render_inference_service(
    spec: FineTuneJobSpec, job: str, namespace: str, artifacts: dict[str, Any]
) -> dict[str, Any]:
    serving = spec.serving
    assert serving is not None
    name = serving_name(spec, job)
    uris = model_uris(spec, artifacts)
    model: dict[str, Any] = {"modelFormat": {"name": "huggingface"}}
    predictor: dict[str, Any] = {"minReplicas": serving.replicas, "model": model}
    args: list[str] = []
    if "model" in uris:
        model["storageUri"] = uris["model"]
    else:
        predictor["storageUris"] = [
            {"uri": uris["base"], "mountPath": BASE_DIR},
            {"uri": uris["adapter"], "mountPath": ADAPTER_DIR},
        ]
        args = [f"--model_dir={BASE_DIR}", "--enable-lora", "--lora-modules", f"{job}={ADAPTER_DIR}"]
    args += list(serving.args)
    optional = {"runtime": serving.runtime, "image": serving.image, "args": args, "env": user_env(serving.env),
                "resources": container_resources(serving.resources.requests, serving.resources.limits, serving.gpus)}  # fmt: skip
    model.update({k: v for k, v in optional.items() if v})
    if serving.service_account_name:
        predictor["serviceAccountName"] = serving.service_account_name
    return {
        "apiVersion": f"{KSERVE_GROUP}/{KSERVE_VERSION}",
        "kind": "InferenceService",
        "metadata": _metadata(name, namespace, job, served_uri(uris)),
        "spec": {"predictor": predictor},
    }


def render_deployment(
    spec: FineTuneJobSpec, job: str, namespace: str, artifacts: dict[str, Any]
) -> dict[str, Any]:
    serving = spec.serving
    assert serving is not None and serving.image
    name = serving_name(spec, job)
    uris = model_uris(spec, artifacts)
    env = [{"name": ENV_MODEL_URI, "value": served_uri(uris)}, {"name": ENV_MODEL_NAME, "value": job},
           {"name": ENV_PORT, "value": str(serving.port)}]  # fmt: skip
    if "base" in uris:
        env += [
            {"name": ENV_BASE_MODEL_URI, "value": uris["base"]},
            {"name": ENV_ADAPTER_URI, "value": uris["adapter"]},
        ]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": serving.image,
        "env": env + storage_env(spec) + user_env(serving.env),  # the user's last: theirs win
        "ports": [{"name": "http", "containerPort": serving.port}],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    if serving.args:
        container["args"] = list(serving.args)
    if resources := container_resources(serving.resources.requests, serving.resources.limits, serving.gpus):
        container["resources"] = resources
    # Pod Security "restricted", as the trainer: the image runs as serving.runAsUser, never root.
    user = serving.run_as_user
    security = {"runAsNonRoot": True, "runAsUser": user, "runAsGroup": user, "fsGroup": user,
                "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip
    pod: dict[str, Any] = {"securityContext": security, "containers": [container]}
    if serving.service_account_name:
        pod["serviceAccountName"] = serving.service_account_name
    selector = {LABEL_SERVING: job}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(name, namespace, job, served_uri(uris)),
        "spec": {
            "replicas": serving.replicas,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": serving_labels(job)}, "spec": pod},
        },
    }


def render_serving(
    spec: FineTuneJobSpec, job: str, namespace: str, artifacts: dict[str, Any]
) -> dict[str, Any]:
    """The InferenceService or Deployment for a succeeded job (spec.serving must be set)."""
    assert spec.serving is not None
    if spec.serving.kind == "Deployment":
        return render_deployment(spec, job, namespace, artifacts)
    return render_inference_service(spec, job, namespace, artifacts)
