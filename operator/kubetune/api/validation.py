"""What the CRD schema cannot check, and readable messages for what pydantic refuses.

Each problem names the field (camelCase, as the user wrote it) and the fix. The
operator refuses a spec with any problem (phase Failed, condition SpecValid=False)
and `kubetune validate` prints them. The CEL rules in the CRD are repeated here
so that `kubetune validate` catches them without a cluster.
"""

from __future__ import annotations

import math
import posixpath
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

from pydantic import ValidationError

from kubetune.api import elastic
from kubetune.api.contract import (
    CACHE_MOUNT_DIR,
    CONFIG_MOUNT_DIR,
    ENV_CONFIG_PATH,
    ENV_PVC_ROOT,
    ENV_REGISTRY_AUTH,
    ENV_TERMINATION_LOG,
    PVC_ROOT,
    REGISTRY_AUTH_DIR,
)
from kubetune.api.crd import MAX_NAME_LENGTH
from kubetune.api.methods import PROMPT_LEARNING_METHODS, is_adapter, served_artifact, writes_full_model
from kubetune.api.models import (
    API_VERSION,
    DATA_URI,
    KIND,
    OCI_REFERENCE,
    QUANTITY,
    FineTuneJob,
    FineTuneJobSpec,
)
from kubetune.api.names import workload_name
from kubetune.api.rules import EVALUATION_RULES, SPEC_RULES
from kubetune.api.uris import spec_uris

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

# Environment the operator sets itself; a user value would silently break the gang.
RESERVED_ENV = frozenset(
    {
        ENV_CONFIG_PATH,
        ENV_PVC_ROOT,
        ENV_TERMINATION_LOG,
        ENV_REGISTRY_AUTH,
        "MASTER_ADDR",
        "MASTER_PORT",
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "NODE_RANK",
        "JOB_COMPLETION_INDEX",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    }
)
# What a pattern in the models means, for people.
PATTERN_HINTS = {
    QUANTITY: "a Kubernetes quantity such as 8, 500m or 64Gi",
    DATA_URI: "s3://bucket/key, pvc://claim/path, file://path, /absolute/path or hf://org/name",
    OCI_REFERENCE: "registry/repository:tag with the registry host named, e.g. ghcr.io/org/model:v1 or 127.0.0.1:5000/models/tiny:v1",
}

# Kubernetes' own limits on what the pods and their Job carry.
MAX_ANNOTATIONS_BYTES = 256 * 1024  # all annotations of one object together
MAX_LABEL_VALUE = 63
DNS_LABEL_MAX = 63  # pod hostnames, Service and Job names used in DNS
LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# Mount paths the operator uses itself.
RESERVED_MOUNTS = ("/dev/shm", CONFIG_MOUNT_DIR, PVC_ROOT, CACHE_MOUNT_DIR, REGISTRY_AUTH_DIR)
# The volume types Pod Security "restricted" admits: the pods must run in namespaces that enforce it.
RESTRICTED_VOLUMES = (
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
)
# Pod fields the API has no place for because Pod Security "restricted" refuses them; a user who writes one
# is told why, not only that the field is unknown.
PRIVILEGED_FIELDS = frozenset({"securityContext", "containerSecurityContext", "privileged", "capabilities", "hostNetwork",
                               "hostPID", "hostIPC", "hostPath", "hostPort", "hostUsers", "runAsUser", "procMount"})  # fmt: skip
RESTRICTED_HINT = ('kubetune pods run under Pod Security "restricted" (non-root, no privilege or added capabilities, '
                   "no host namespaces or paths), so the spec has no such field")  # fmt: skip
# Bounds on the pod's sizes (bytes).
GI = 1 << 30
SIZE_BOUNDS = {
    "spec.shmSize": (64 << 20, 1 << 40, "64Mi", "1Ti"),
    "spec.scratch.size": (GI, 64 << 40, "1Gi", "64Ti"),
}
_SUFFIX: dict[str, int | Decimal] = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60, "n": Decimal("1e-9"),
           "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "P": 10**15, "E": 10**18}  # fmt: skip
_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$")


def quantity(text: str) -> Decimal:
    """A Kubernetes quantity's value (`64Gi` -> 68719476736, `500m` -> 0.5), as the API server reads it."""
    m = _QUANTITY.match(text.strip())
    if m is None:
        raise ValueError(f"not a quantity: {text!r}")
    number, suffix = Decimal(m.group(1)), m.group(2) or ""
    if suffix[:1] in ("e", "E"):
        return number * Decimal(10) ** int(suffix[1:])
    return number * Decimal(_SUFFIX[suffix])


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest: where, and what to do about it."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class SpecInvalid(ValueError):
    """A manifest the operator refuses; `problems` says why."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


# ------------------------------------------------------- pydantic -> people


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith("function-") or part in ("str", "int", "float", "literal[...]"):
            continue  # pydantic's union/validator branch names, not fields
        else:
            out += f".{part}" if out else part
    return out or "(document)"


def _got(error: Any) -> str:
    value = error.get("input")
    if isinstance(value, dict | list) or value is None:
        return ""
    return f" (got {value!r})"


def _message(error: Any) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    got = _got(error)
    simple = {
        "missing": "is required",
        "extra_forbidden": "is not a known field (check the spelling and the indentation)",
        "int_type": f"must be an integer{got}",
        "int_parsing": f"must be an integer{got}",
        "int_from_float": f"must be a whole number{got}",
        "float_type": f"must be a number{got}",
        "float_parsing": f"must be a number{got}",
        "bool_type": f"must be true or false{got}",
        "bool_parsing": f"must be true or false{got}",
        "string_type": f"must be a string{got}",
        "dict_type": "must be a mapping (key: value)",
        "model_type": "must be a mapping (key: value)",
        "model_attributes_type": "must be a mapping (key: value)",
        "list_type": "must be a list",
    }
    if kind in simple:
        return simple[kind]
    bounds = {
        "greater_than_equal": ("must be >=", "ge"),
        "greater_than": ("must be >", "gt"),
        "less_than_equal": ("must be <=", "le"),
        "less_than": ("must be <", "lt"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        return f"{words} {ctx.get(key)}{got}"
    if kind == "string_too_short":
        return (
            "must not be empty"
            if ctx.get("min_length") == 1
            else f"must be at least {ctx.get('min_length')} characters"
        )
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"takes at most {ctx.get('max_length')} item(s)"
    if kind == "string_pattern_mismatch":
        hint = PATTERN_HINTS.get(str(ctx.get("pattern")), f"a value matching {ctx.get('pattern')}")
        return f"has an unsupported form{got}; expected {hint}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}{got}"
    return f"{error['msg']}{got}"


def problems_from_pydantic(exc: ValidationError, prefix: str = "") -> list[Problem]:
    out = []
    for error in exc.errors():
        field, message = _loc(tuple(error["loc"])), _message(error)
        if error["type"] == "extra_forbidden" and str(error["loc"][-1]) in PRIVILEGED_FIELDS:
            message = f"is not a known field: {RESTRICTED_HINT}"
        if error["type"] == "value_error":
            # A model's own check says what to fix; one that names its field (spec.x.y: ...) is taken at its word.
            message = message.removeprefix("Value error, ")
            named, sep, rest = message.partition(": ")
            if sep and named.startswith("spec.") and " " not in named:
                field, message = named, rest
        out.append(Problem(f"{prefix}{field}" if prefix else field, message))
    return out


# ---------------------------------------------------------- semantic checks


def pvc_claims(spec: FineTuneJobSpec) -> list[str]:
    """PersistentVolumeClaims named by pvc:// URIs, in a stable order (the operator mounts them)."""
    claims: list[str] = []
    for uri in spec_uris(spec).values():
        if uri.startswith("pvc://"):
            claim = uri[len("pvc://") :].split("/", 1)[0]
            if claim not in claims:
                claims.append(claim)
    return claims


def _cel_twins(spec: FineTuneJobSpec) -> list[Problem]:
    """The CRD's CEL rules (kubetune.api.rules), so that a check without a cluster finds the same."""
    return [
        Problem(rule.field, rule.describe(spec))
        for rule in SPEC_RULES + EVALUATION_RULES
        if rule.broken(spec)
    ]


def _storage(spec: FineTuneJobSpec) -> list[Problem]:
    out = []
    s3 = [f for f, uri in spec_uris(spec).items() if uri.startswith("s3://")]
    if s3 and spec.storage.endpoint and spec.storage.secret_ref is None:
        out.append(
            Problem(
                "spec.storage.secretRef",
                f"is required with a custom S3 endpoint ({spec.storage.endpoint}) used by {', '.join(s3)}: "
                "create a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY and name it here",
            )
        )
    ref = spec.storage.secret_ref
    if ref is not None and not DNS_1123_SUBDOMAIN.match(ref.name):
        out.append(
            Problem(
                "spec.storage.secretRef.name",
                f"{ref.name!r} is not a valid Secret name (lowercase DNS subdomain)",
            )
        )
    for i, secret in enumerate(spec.image_pull_secrets):
        if not DNS_1123_SUBDOMAIN.match(secret.name):
            out.append(
                Problem(f"spec.imagePullSecrets[{i}].name", f"{secret.name!r} is not a valid Secret name")
            )
    return out


def _method(spec: FineTuneJobSpec) -> list[Problem]:
    out = []
    if spec.freeze is not None:
        if is_adapter(spec):
            out.append(
                Problem(
                    "spec.freeze",
                    f"applies to method: full ({spec.method} already freezes the base model); remove spec.freeze, "
                    "or choose the adapted modules with spec.lora.targetModules",
                )
            )
        if spec.freeze.first_n_layers is not None and spec.freeze.trainable_modules:
            out.append(
                Problem(
                    "spec.freeze",
                    "set either firstNLayers or trainableModules, not both (they contradict each other)",
                )
            )
        if spec.freeze.first_n_layers is None and not spec.freeze.trainable_modules:
            out.append(Problem("spec.freeze", "is empty: set firstNLayers or trainableModules, or remove it"))
    return out


def _methods(spec: FineTuneJobSpec) -> list[Problem]:
    """The adapter methods, QLoRA, DPO and the learning-rate controls."""
    out = []
    if spec.method in PROMPT_LEARNING_METHODS and spec.output.merge_adapter:
        out.append(
            Problem(
                "spec.output.mergeAdapter",
                f"method {spec.method} adds virtual tokens, not weights: peft cannot merge it into the base model; "
                "remove mergeAdapter (the adapter loads with PeftModel.from_pretrained)",
            )
        )
    if spec.method in PROMPT_LEARNING_METHODS and spec.dataset.packing:
        out.append(
            Problem(
                "spec.dataset.packing",
                f"cannot be used with method {spec.method} (peft drops the position ids packing needs); set packing: false",
            )
        )
    if spec.ia3 is not None and spec.ia3.feedforward_modules:
        extra = [m for m in spec.ia3.feedforward_modules if m not in spec.ia3.target_modules]
        if extra:
            out.append(
                Problem(
                    "spec.ia3.feedforwardModules", f"{extra} must also be listed in spec.ia3.targetModules"
                )
            )
    if spec.ia3 is not None and spec.ia3.target_modules and not spec.ia3.feedforward_modules:
        out.append(
            Problem(
                "spec.ia3.feedforwardModules",
                "is required with targetModules: name which of them are feed-forward layers (e.g. [down_proj])",
            )
        )
    q, d = spec.model.quantization, spec.distributed
    if q is not None:
        if d.backend == "deepspeed" or d.offload_optimizer or d.offload_params:
            out.append(
                Problem(
                    "spec.distributed.backend",
                    "QLoRA trains with DDP (each GPU holds the quantized base); DeepSpeed ZeRO cannot partition "
                    "bitsandbytes weights here: set backend: ddp (or auto) without offload",
                )
            )
    if spec.objective == "dpo":
        if spec.dataset.packing:
            out.append(
                Problem(
                    "spec.dataset.packing",
                    "cannot be used with objective dpo (each pair is scored as whole sequences); set packing: false",
                )
            )
        if spec.dataset.format not in ("auto", "preference"):
            out.append(
                Problem(
                    "spec.dataset.format",
                    f"objective dpo reads prompt/chosen/rejected records; set format: preference (got {spec.dataset.format})",
                )
            )
        dpo = spec.dpo
        if dpo is not None and dpo.label_smoothing and dpo.loss_type not in ("sigmoid", "robust"):
            out.append(
                Problem(
                    "spec.dpo.labelSmoothing",
                    f"applies to lossType sigmoid or robust, not {dpo.loss_type}; remove it",
                )
            )
        if spec.training.eval_generation_samples:
            out.append(
                Problem(
                    "spec.training.evalGenerationSamples",
                    "is for objective sft; with dpo, reward accuracy is reported instead: remove it",
                )
            )
    t = spec.training
    if t.layer_lr_decay is not None and spec.method != "full":
        out.append(
            Problem(
                "spec.training.layerLrDecay",
                f"applies to method full (every layer trains); with {spec.method} only the adapter trains: remove it",
            )
        )
    if (
        t.head_learning_rate is not None
        and is_adapter(spec)
        and not (spec.lora and spec.lora.modules_to_save)
    ):
        out.append(
            Problem(
                "spec.training.headLearningRate",
                f"has no head to apply to: method {spec.method} trains no head; add lm_head to spec.lora.modulesToSave or remove it",
            )
        )
    return out


def _training(spec: FineTuneJobSpec) -> list[Problem]:
    out = []
    has_eval = bool(spec.dataset.eval) or spec.dataset.eval_split > 0
    if spec.training.eval_steps is not None and not has_eval:
        out.append(
            Problem(
                "spec.training.evalSteps",
                "needs evaluation data: set spec.dataset.eval or spec.dataset.evalSplit > 0",
            )
        )
    d = spec.distributed
    if d.elastic and elastic.node_counts(spec) == [d.nodes]:
        micro = spec.training.per_device_batch_size * d.procs_per_node
        out.append(
            Problem(
                "spec.distributed.minNodes",
                f"the gang can never shrink: the global batch of {elastic.global_batch(spec)} sequences is not a multiple "
                f"of perDeviceBatchSize x procsPerNode x n ({micro} x n) for any n from {d.min_nodes} to {d.nodes - 1}; "
                f"set training.globalBatchSize to a multiple of {micro} x each node count to allow "
                f"(e.g. {micro * d.nodes * (d.nodes - 1)} also trains on {d.nodes - 1}), or remove minNodes",
            )
        )
    if d.gpus_per_node == 0 and d.backend == "deepspeed":
        out.append(
            Problem(
                "spec.distributed.backend",
                "deepspeed needs GPUs: set gpusPerNode > 0, or use backend ddp on CPU",
            )
        )
    return out


def _pod(spec: FineTuneJobSpec) -> list[Problem]:
    out = []
    for kind in ("requests", "limits"):
        if "nvidia.com/gpu" in getattr(spec.resources, kind):
            out.append(
                Problem(
                    f"spec.resources.{kind}",
                    "must not name nvidia.com/gpu: set spec.distributed.gpusPerNode instead",
                )
            )
    for i, env in enumerate(spec.env):
        if env.name in RESERVED_ENV:
            out.append(Problem(f"spec.env[{i}].name", f"{env.name} is set by kubetune; remove it"))
        if env.value is not None and env.value_from is not None:
            out.append(Problem(f"spec.env[{i}]", "set value or valueFrom, not both"))
    for field, size in (("spec.shmSize", spec.shm_size), ("spec.scratch.size", spec.scratch.size)):
        low, high, low_text, high_text = SIZE_BOUNDS[field]
        if not low <= quantity(size) <= high:
            out.append(Problem(field, f"must be between {low_text} and {high_text} (got {size!r})"))
    names: set[str] = set()
    for i, vol in enumerate(spec.volumes):
        if vol.name in names:
            out.append(Problem(f"spec.volumes[{i}].name", f"{vol.name!r} is used twice"))
        names.add(vol.name)
        if vol.name.startswith("kubetune-"):
            out.append(
                Problem(f"spec.volumes[{i}].name", f"{vol.name!r} is reserved by kubetune; pick another name")
            )
        for reserved in RESERVED_MOUNTS:
            if vol.mount_path == reserved or vol.mount_path.startswith(reserved + "/"):
                out.append(
                    Problem(
                        f"spec.volumes[{i}].mountPath", f"{reserved} is used by kubetune; mount elsewhere"
                    )
                )
        if len(vol.source) != 1:
            out.append(
                Problem(
                    f"spec.volumes[{i}].source",
                    "must hold exactly one volume source, e.g. {persistentVolumeClaim: {claimName: cache}}",
                )
            )
        for kind in sorted(set(vol.source) - set(RESTRICTED_VOLUMES)):
            out.append(Problem(f"spec.volumes[{i}].source.{kind}",
                               f'a {kind} volume breaks Pod Security "restricted", which the pods must meet; use a '
                               "persistentVolumeClaim (or spec.scratch for node-local space)"))  # fmt: skip
    return out


def _location(uri: str) -> tuple[str, str] | None:
    """(scheme, normalised path) of a URI the job reads or writes; None for hf:// (never written)."""
    for scheme in ("s3://", "pvc://", "file://"):
        if uri.startswith(scheme):
            return scheme, posixpath.normpath(uri[len(scheme) :] or ".")
    if uri.startswith("/"):
        return "file://", posixpath.normpath(uri)
    return None


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def outputs_overlap(a: str, b: str) -> bool:
    """Whether two output URIs are the same place or one lies inside the other (hf:// is never an output)."""
    la, lb = _location(a), _location(b)
    return (
        la is not None
        and lb is not None
        and la[0] == lb[0]
        and (_inside(la[1], lb[1]) or _inside(lb[1], la[1]))
    )


def _output(spec: FineTuneJobSpec) -> list[Problem]:
    """The output must not overlap an input: the job writes COMPLETE, model/ and checkpoints/ there."""
    out = _location(spec.output.uri)
    if out is None:
        return []
    problems = []
    for field, uri in spec_uris(spec).items():
        if field == "spec.output.uri":
            continue
        loc = _location(uri)
        if loc is None or loc[0] != out[0]:
            continue
        if _inside(out[1], loc[1]) or _inside(loc[1], out[1]):
            problems.append(
                Problem(
                    "spec.output.uri",
                    f"{spec.output.uri} overlaps {field} ({uri}): the job writes its checkpoints, model/ and COMPLETE "
                    "there; choose an output directory that neither holds nor sits inside an input",
                )
            )
    return problems


SERVABLE = ("s3://", "pvc://")
BASE_SERVABLE = ("s3://", "pvc://", "hf://")


def _serving(spec: FineTuneJobSpec) -> list[Problem]:
    """What a serving pod must be able to load: merged weights or a LoRA adapter, from a place it can read."""
    serving = spec.serving
    if serving is None:
        return []
    out = []
    served = served_artifact(spec)
    if served == "merged" and not writes_full_model(spec):
        out.append(
            Problem(
                "spec.serving.model",
                "merged, but the job writes no merged weights (spec.output.mergeAdapter: false); set mergeAdapter: true, or serving.model: adapter",
            )
        )
    elif served == "adapter" and spec.method not in ("lora", "dora") and serving.model == "auto":
        out.append(
            Problem(
                "spec.serving",
                f"a {spec.method} adapter has no merged weights and vLLM cannot load it; train with method lora, dora or full to serve the result",
            )
        )
    if not spec.output.uri.startswith(SERVABLE):
        out.append(
            Problem(
                "spec.output.uri",
                f"{spec.output.uri} cannot be read by serving pods (spec.serving); write to s3:// or pvc://",
            )
        )
    if (
        served == "adapter"
        and serving.kind == "InferenceService"
        and not spec.model.source.startswith(BASE_SERVABLE)
    ):
        out.append(
            Problem(
                "spec.model.source",
                f"{spec.model.source}: the InferenceService loads the base model of the adapter from here; use s3://, pvc:// or hf://, or serve merged weights",
            )
        )
    for i, env in enumerate(serving.env):
        if env.value is not None and env.value_from is not None:
            out.append(Problem(f"spec.serving.env[{i}]", "set value or valueFrom, not both"))
    for kind in ("requests", "limits"):
        if "nvidia.com/gpu" in getattr(serving.resources, kind):
            out.append(
                Problem(
                    f"spec.serving.resources.{kind}",
                    "must not name nvidia.com/gpu: set spec.serving.gpus instead",
                )
            )
    return out


def _publish(spec: FineTuneJobSpec) -> list[Problem]:
    """spec.output.publish must name something the job writes, and a Secret by a valid name."""
    publish = spec.output.publish
    if publish is None:
        return []
    out = []
    if publish.oci is None and publish.huggingface is None:
        out.append(
            Problem(
                "spec.output.publish", "set spec.output.publish.oci, spec.output.publish.huggingface or both"
            )
        )
    if publish.huggingface is not None and not DNS_1123_SUBDOMAIN.match(publish.huggingface.token_secret):
        out.append(
            Problem(
                "spec.output.publish.huggingface.tokenSecret",
                f"{publish.huggingface.token_secret!r} is not a valid Secret name (lowercase DNS subdomain)",
            )
        )
    if publish.credentials_secret is not None and not DNS_1123_SUBDOMAIN.match(publish.credentials_secret):
        out.append(
            Problem(
                "spec.output.publish.credentialsSecret",
                f"{publish.credentials_secret!r} is not a valid Secret name (lowercase DNS subdomain)",
            )
        )
    if publish.artifact == "model" and not writes_full_model(spec):
        out.append(
            Problem(
                "spec.output.publish.artifact",
                f"model: method {spec.method} with this spec.output.mergeAdapter writes no merged model; "
                "set artifact: adapter, or spec.output.mergeAdapter: true where the method can merge",
            )
        )
    if publish.artifact == "adapter" and not is_adapter(spec):
        out.append(
            Problem(
                "spec.output.publish.artifact",
                "adapter: method full trains no adapter; set artifact: model or remove it",
            )
        )
    return out


def _tracking(spec: FineTuneJobSpec) -> list[Problem]:
    """spec.tracking: Secrets by valid names; W&B online needs its API key (the CEL rule's twin)."""
    tracking = spec.tracking
    if tracking is None:
        return []
    secrets = {
        "spec.tracking.mlflow.credentialsSecret": tracking.mlflow.credentials_secret
        if tracking.mlflow
        else None,
        "spec.tracking.wandb.apiKeySecret": tracking.wandb.api_key_secret if tracking.wandb else None,
    }
    out = [Problem(f, f"{name!r} is not a valid Secret name (lowercase DNS subdomain)") for f, name in secrets.items()
           if name is not None and not DNS_1123_SUBDOMAIN.match(name)]  # fmt: skip
    if tracking.wandb is not None and tracking.wandb.mode == "online" and not tracking.wandb.api_key_secret:
        out.append(
            Problem(
                "spec.tracking.wandb",
                "mode online needs apiKeySecret (a Secret with the key WANDB_API_KEY); or set mode: offline",
            )
        )
    return out


def _labels(field: str, labels: dict[str, str]) -> list[Problem]:
    out = []
    for key, value in labels.items():
        prefix, _, label = key.rpartition("/")
        if (
            (prefix and (len(prefix) > 253 or not DNS_1123_SUBDOMAIN.match(prefix)))
            or len(label) > 63
            or not LABEL_NAME.match(label)
        ):
            out.append(
                Problem(
                    f"{field}[{key[:80]!r}]",
                    "is not a valid label key: [prefix/]name, name at most 63 of a-z, A-Z, 0-9, '-', '_', '.'",
                )
            )
        if len(value) > MAX_LABEL_VALUE or not LABEL_VALUE.match(value):
            out.append(
                Problem(
                    f"{field}[{key[:80]!r}]",
                    f"value must be at most {MAX_LABEL_VALUE} of a-z, A-Z, 0-9, '-', '_', '.', starting and ending alphanumeric",
                )
            )
    return out


def _annotations(field: str, annotations: dict[str, str]) -> list[Problem]:
    size = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
    if size > MAX_ANNOTATIONS_BYTES:
        return [
            Problem(
                field,
                f"total {size:,} bytes; Kubernetes allows at most {MAX_ANNOTATIONS_BYTES:,} (keep large data in a ConfigMap or S3)",
            )
        ]
    return []


def _metadata_maps(spec: FineTuneJobSpec) -> list[Problem]:
    return _labels("spec.labels", spec.labels) + _annotations("spec.annotations", spec.annotations)


def check_name(name: str | None, spec: FineTuneJobSpec | None = None) -> list[Problem]:
    """metadata.name, and the names derived from it: Service `<name>`, Job `<name>-r<restart>`, pods' hostnames
    `<name>-r<restart>-<index>` (DNS labels, at most 63 characters)."""
    if not name:
        return [Problem("metadata.name", "is required")]
    if len(name) > MAX_NAME_LENGTH:
        return [
            Problem(
                "metadata.name",
                f"must be at most {MAX_NAME_LENGTH} characters (got {len(name)}); pods are named after it",
            )
        ]
    if not DNS_1035.match(name):
        return [
            Problem(
                "metadata.name",
                f"{name!r} must start with a lowercase letter and hold only a-z, 0-9 and '-' (it names a Service and the pods)",
            )
        ]
    if spec is not None:
        hostname = f"{workload_name(name)}-{spec.distributed.nodes - 1}"
        if len(hostname) > DNS_LABEL_MAX:
            return [
                Problem(
                    "metadata.name",
                    f"the last pod's hostname {hostname!r} would be {len(hostname)} characters (at most {DNS_LABEL_MAX}); "
                    f"shorten the name by {len(hostname) - DNS_LABEL_MAX}",
                )
            ]
    return []


def check_spec(spec: FineTuneJobSpec) -> list[Problem]:
    """Every problem with a spec that parsed; empty when the operator can run it."""
    return (
        _cel_twins(spec)
        + _storage(spec)
        + _output(spec)
        + _publish(spec)
        + _tracking(spec)
        + _method(spec)
        + _methods(spec)
        + _training(spec)
        + _pod(spec)
        + _metadata_maps(spec)
        + _serving(spec)
    )


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # the CRD's integers are format int64


def check_values(value: Any, where: str = "") -> list[Problem]:
    """What JSON (and so the API server) cannot carry: non-finite numbers, integers beyond int64, non-string keys,
    dates, bytes.
    Iterative, so a deep document cannot exhaust the stack."""
    out: list[Problem] = []
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack and len(out) < 20:
        node, path = stack.pop()
        if isinstance(node, dict):
            for key, item in node.items():
                if not isinstance(key, str):
                    out.append(Problem(path or "(document)", f"key {key!r} must be a string (quote it)"))
                    continue
                stack.append((item, f"{path}.{key}" if path else key))
        elif isinstance(node, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node))
        elif isinstance(node, int) and not isinstance(node, bool) and not INT64_MIN <= node <= INT64_MAX:
            out.append(
                Problem(
                    path,
                    f"must fit a 64-bit integer ({INT64_MIN} to {INT64_MAX}; got {node}): the API server stores int64",
                )
            )
        elif isinstance(node, float) and not math.isfinite(node):
            out.append(
                Problem(
                    path, f"must be a finite number (got {node}); the API server cannot store .inf or .nan"
                )
            )
        elif not (node is None or isinstance(node, str | int | float | bool)):
            out.append(
                Problem(
                    path,
                    f"must be a string, number, true/false, list or mapping (got {type(node).__name__}); quote it",
                )
            )
    return out


def _strict(model: Any, data: Any, prefix: str = "") -> tuple[Any, list[Problem]]:
    """Types as the API server checks them: "16" is not an integer, "false" not a boolean."""
    try:
        return model.model_validate(data, strict=True), []
    except ValidationError as exc:
        return None, problems_from_pydantic(exc, prefix=prefix)


def validate_manifest(doc: Any) -> tuple[FineTuneJob | None, list[Problem]]:
    """The one check of a FineTuneJob document (read from YAML or the API): every problem at once.

    `kubetune validate`, `render` and `run` call it; the operator calls `parse_spec`, its spec-only twin."""
    if not isinstance(doc, dict):
        return None, [Problem("(document)", "must be a mapping with apiVersion, kind, metadata and spec")]
    problems = check_values(doc)
    if doc.get("apiVersion") != API_VERSION:
        got = f" (got {doc['apiVersion']!r})" if "apiVersion" in doc else ""
        problems.append(Problem("apiVersion", f"must be {API_VERSION}{got}"))
    if doc.get("kind") != KIND:
        problems.append(Problem("kind", f"must be {KIND}"))
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return None, [
            *problems,
            Problem("metadata", "must be a mapping with at least a name, e.g. metadata: {name: my-job}"),
        ]
    for key, check in (("labels", _labels), ("annotations", _annotations)):
        value = meta.get(key)
        if value is not None and not isinstance(value, dict):
            problems.append(Problem(f"metadata.{key}", "must be a mapping of strings"))
        elif isinstance(value, dict) and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            problems.append(
                Problem(f"metadata.{key}", "values must be strings (quote numbers and true/false)")
            )
        elif value:
            problems += check(f"metadata.{key}", value)
    name = meta.get("name")
    if not isinstance(name, str):
        problems.append(
            Problem("metadata.name", "is required" if name is None else f"must be a string (got {name!r})")
        )
    job, parse_problems = _strict(FineTuneJob, {k: v for k, v in doc.items() if k != "status"})
    seen = {p.field for p in problems}
    problems += [p for p in parse_problems if p.field not in seen]
    if job is None:
        return None, problems
    problems += (check_name(name, job.spec) if isinstance(name, str) else []) + check_spec(job.spec)
    return (None if problems else job), problems


def parse_spec(spec: Any, name: str | None = None) -> FineTuneJobSpec:
    """The operator's entry: the typed spec, or SpecInvalid listing every problem."""
    problems = check_values(spec, "spec")
    if problems:
        raise SpecInvalid(problems)
    parsed, problems = _strict(FineTuneJobSpec, spec, prefix="spec.")
    if parsed is None:
        raise SpecInvalid(problems)
    problems = (check_name(name, parsed) if name is not None else []) + check_spec(parsed)
    if problems:
        raise SpecInvalid(problems)
    return cast(FineTuneJobSpec, parsed)
