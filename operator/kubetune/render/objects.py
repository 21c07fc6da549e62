"""FineTuneJob -> the Kubernetes objects that run it. Pure: plain dicts in, plain dicts out.

One FineTuneJob owns:
- a ConfigMap `<name>-config` with the trainer's resolved config;
- a headless Service `<name>` (publishNotReadyAddresses, so rank 0's DNS name
  resolves before any pod is Ready: torchrun needs it to rendezvous);
- an Indexed batch/v1 Job `<name>-r0` with completions = parallelism = nodes. Its
  pods' hostnames are `<name>-r0-<index>.<name>`; index 0 is rank 0;
- with spec.scheduling.gang, the gang scheduler's PodGroup `<name>` (render/gang.py).

One Job serves every gang restart of a run, so that a queue (Kueue) that admitted
it keeps it admitted. torchrun's static rendezvous needs every rank to restart
together from the same checkpoint: the operator restarts the whole gang by
deleting the pods of the failed generation; the Job controller replaces them.
The Job's podFailurePolicy ignores every pod failure (the restart budget is the
operator's, spec.runPolicy.backoffLimit), and every pod starts behind the
scheduling gate GANG_GATE, which the operator lifts once a pod exists for every
rank and no pod of the earlier generation is left.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from kubetune.api.contract import (
    CACHE_MOUNT_DIR,
    CONFIG_FILE,
    CONFIG_MOUNT_DIR,
    CONFIG_PATH,
    ENV_CACHE_DIR,
    ENV_CONFIG_PATH,
    ENV_POD_NAME,
    ENV_PVC_ROOT,
    ENV_REGISTRY_AUTH,
    ENV_TERMINATION_LOG,
    ENV_TRAINER_IMAGE,
    PVC_ROOT,
    REGISTRY_AUTH_DIR,
    REGISTRY_AUTH_FILE,
    REGISTRY_AUTH_PATH,
    TERMINATION_LOG,
)
from kubetune.api.models import EnvVar, FineTuneJobSpec
from kubetune.api.names import (
    CONTAINER,
    DEFAULT_IMAGE,
    GANG_GATE,
    KUEUE_LABELS,
    LABEL_ROLE,
    config_map_name,
    master_addr,
    selector_labels,
    service_name,
    standard_labels,
    workload_name,
)
from kubetune.api.trainer_config import DEFAULT_PROGRESS_PORT, DEFAULT_RDZV_PORT, TrainerConfig
from kubetune.api.validation import pvc_claims
from kubetune.render.gang import pod_membership, render_pod_group
from kubetune.render.trainer_config import render_trainer_config

CONFIG_DIR: Final = CONFIG_MOUNT_DIR
CONFIG_KEY: Final = CONFIG_FILE
CACHE_DIR: Final = CACHE_MOUNT_DIR
UID: Final = 1000
EPHEMERAL_STORAGE: Final = "ephemeral-storage"
MLFLOW_CREDENTIAL_KEYS: Final = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


def owned_labels(name: str, component: str) -> dict[str, str]:
    """The labels of an object a FineTuneJob owns: the recommended app.kubernetes.io/* ones and its job name."""
    return {**standard_labels(name, component), **selector_labels(name)}


def trainer_config(
    spec: FineTuneJobSpec, name: str, namespace: str, uid: str, run: int = 1, nodes: int | None = None
) -> TrainerConfig:
    return render_trainer_config(spec, name, namespace, uid, run=run, nodes=nodes)


def render_config_map(
    spec: FineTuneJobSpec, name: str, namespace: str, uid: str = "", run: int = 1, nodes: int | None = None
) -> dict[str, Any]:
    """The trainer config; `nodes`: an elastic gang's size when it trains on fewer than spec.distributed.nodes."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_map_name(name),
            "namespace": namespace,
            "labels": owned_labels(name, "config"),
        },
        "data": {
            CONFIG_KEY: trainer_config(spec, name, namespace, uid, run, nodes).dump_yaml()
        },  # run: the output's owner record
    }


def render_service(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(name),
            "namespace": namespace,
            "labels": owned_labels(name, "rendezvous"),
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(name),
            "ports": [
                {"name": "rendezvous", "port": DEFAULT_RDZV_PORT, "targetPort": DEFAULT_RDZV_PORT},
                {"name": "progress", "port": DEFAULT_PROGRESS_PORT, "targetPort": DEFAULT_PROGRESS_PORT},
            ],
        },
    }


def torchrun_args(spec: FineTuneJobSpec, name: str) -> list[str]:
    d = spec.distributed
    return [
        "--nnodes",
        str(d.nodes),
        "--nproc-per-node",
        str(d.procs_per_node),
        "--node-rank",
        "$(JOB_COMPLETION_INDEX)",  # expanded by the kubelet from the Job controller's env
        "--master-addr",
        master_addr(name),
        "--master-port",
        str(DEFAULT_RDZV_PORT),
        "--max-restarts",
        "0",  # restarts are whole-gang, by the operator
        "-m",
        "kubetune_trainer",
        "--config",
        CONFIG_PATH,
    ]


def trainer_command(spec: FineTuneJobSpec, name: str) -> tuple[list[str], list[str]]:
    """The container's command and args: torchrun, behind the reachability probe of rank 0's rendezvous port
    (kubetune_trainer.reach, which then execs torchrun) when several pods rendezvous and the check is on."""
    check = spec.distributed.network_check
    if check.enabled and spec.distributed.nodes > 1:
        probe = ["--timeout-seconds", str(check.timeout_seconds), "--", "torchrun"]
        return ["python", "-m", "kubetune_trainer.reach"], probe + torchrun_args(spec, name)
    return ["torchrun"], torchrun_args(spec, name)


def _env(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": ENV_CONFIG_PATH, "value": CONFIG_PATH},
        {"name": ENV_TERMINATION_LOG, "value": TERMINATION_LOG},
        {"name": ENV_CACHE_DIR, "value": CACHE_DIR},
        {"name": ENV_PVC_ROOT, "value": PVC_ROOT},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "HOME", "value": CACHE_DIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": ENV_POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    if spec.output.publish is not None and spec.output.publish.credentials_secret:
        env.append(
            {"name": ENV_REGISTRY_AUTH, "value": REGISTRY_AUTH_PATH}
        )  # a path; the file holds the secret
    env += secret_env(spec)
    if spec.distributed.gpus_per_node > 0:
        env += [
            {"name": "NCCL_DEBUG", "value": "WARN"},
            {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
            # A rank that hangs in a collective should fail the gang, not wedge it.
            {"name": "TORCH_NCCL_BLOCKING_WAIT", "value": "0"},
        ]
    else:
        env += [
            {"name": "OMP_NUM_THREADS", "value": str(_cpu_threads(spec))},
        ]
    return env + storage_env(spec) + user_env(spec.env)


def _from_secret(var: str, secret: str, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": var}
    if optional:
        ref["optional"] = True
    return {"name": var, "valueFrom": {"secretKeyRef": ref}}


def secret_env(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """Tracker and Hub credentials, each from the Secret the spec names (env from a secretKeyRef: the values
    are never in the ConfigMap, the pod spec or a log). MLflow takes a user and password or a token."""
    env: list[dict[str, Any]] = []
    tracking = spec.tracking
    if (
        tracking is not None
        and tracking.mlflow is not None
        and (secret := tracking.mlflow.credentials_secret)
    ):
        env += [_from_secret(var, secret, optional=True) for var in MLFLOW_CREDENTIAL_KEYS]
    if tracking is not None and tracking.wandb is not None and (secret := tracking.wandb.api_key_secret):
        env.append(_from_secret("WANDB_API_KEY", secret))
    publish = spec.output.publish
    if publish is not None and publish.huggingface is not None:
        env.append(_from_secret("HF_TOKEN", publish.huggingface.token_secret))
    return env


def storage_env(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """The job's S3 settings (region, endpoint, keys from its Secret): for the trainer and a serving Deployment."""
    s = spec.storage
    env: list[dict[str, Any]] = [{"name": "AWS_DEFAULT_REGION", "value": s.region}]
    if s.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": s.endpoint})
    if s.secret_ref is not None:
        keys = [
            ("AWS_ACCESS_KEY_ID", s.secret_ref.access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", s.secret_ref.secret_access_key_key),
        ]
        if s.secret_ref.session_token_key:
            keys.append(("AWS_SESSION_TOKEN", s.secret_ref.session_token_key))
        env += [
            {"name": var, "valueFrom": {"secretKeyRef": {"name": s.secret_ref.name, "key": key}}}
            for var, key in keys
        ]
    return env


def user_env(variables: Iterable[EnvVar]) -> list[dict[str, Any]]:
    """The user's env entries as a container's env: `valueFrom` as given, else `value` ("" when unset)."""
    return [
        {"name": v.name, "valueFrom": v.value_from}
        if v.value_from is not None
        else {"name": v.name, "value": v.value or ""}
        for v in variables
    ]


def _cpu_threads(spec: FineTuneJobSpec) -> int:
    """Threads per CPU process: the pod's CPU request split between its processes (at least 1)."""
    cpu = spec.resources.requests.get("cpu") or spec.resources.limits.get("cpu")
    try:
        cores = float(cpu[:-1]) / 1000 if cpu and cpu.endswith("m") else float(cpu or 1)
    except ValueError:
        cores = 1.0
    return max(1, int(cores // spec.distributed.procs_per_node))


def _volumes(spec: FineTuneJobSpec, name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "kubetune-config", "configMap": {"name": config_map_name(name)}},
        {"name": "kubetune-shm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
        scratch_volume(spec, name),
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "kubetune-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "kubetune-shm", "mountPath": "/dev/shm"},
        {"name": "kubetune-cache", "mountPath": CACHE_DIR},
    ]
    for i, claim in enumerate(pvc_claims(spec)):
        volumes.append({"name": f"kubetune-pvc-{i}", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": f"kubetune-pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}"})
    if (publish := spec.output.publish) is not None and publish.credentials_secret:
        # The whole dockerconfigjson as one read-only file: never env, never a log line.
        secret = {"secretName": publish.credentials_secret, "defaultMode": 0o440,
                  "items": [{"key": ".dockerconfigjson", "path": REGISTRY_AUTH_FILE}]}  # fmt: skip
        volumes.append({"name": "kubetune-registry-auth", "secret": secret})
        mounts.append({"name": "kubetune-registry-auth", "mountPath": REGISTRY_AUTH_DIR, "readOnly": True})
    for vol in spec.volumes:
        volumes.append({"name": vol.name, **vol.source})
        mounts.append({"name": vol.name, "mountPath": vol.mount_path, "readOnly": vol.read_only})
    return volumes, mounts


def scratch_volume(spec: FineTuneJobSpec, name: str) -> dict[str, Any]:
    """$KUBETUNE_CACHE_DIR: an emptyDir limited to spec.scratch.size, or with a StorageClass a generic ephemeral
    volume (one claim per pod, deleted with the pod)."""
    scratch = spec.scratch
    if scratch.storage_class_name is None:
        return {"name": "kubetune-cache", "emptyDir": {"sizeLimit": scratch.size}}
    claim = {"accessModes": ["ReadWriteOnce"], "storageClassName": scratch.storage_class_name,
             "resources": {"requests": {"storage": scratch.size}}}  # fmt: skip
    template = {"metadata": {"labels": owned_labels(name, "scratch")}, "spec": claim}
    return {"name": "kubetune-cache", "ephemeral": {"volumeClaimTemplate": template}}


def _resources(spec: FineTuneJobSpec) -> dict[str, Any]:
    requests = dict(spec.resources.requests)
    if spec.scratch.storage_class_name is None:
        # The emptyDir is node disk: request it, so that the scheduler places the pod where it fits.
        requests.setdefault(EPHEMERAL_STORAGE, spec.scratch.size)
    return container_resources(requests, spec.resources.limits, spec.distributed.gpus_per_node)


def container_resources(requests: Mapping[str, Any], limits: Mapping[str, Any], gpus: int) -> dict[str, Any]:
    """A container's resources: the user's requests and limits, plus `gpus` nvidia.com/gpu in both (when > 0)."""
    requests, limits = dict(requests), dict(limits)
    if gpus > 0:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def render_pod_template(
    spec: FineTuneJobSpec, name: str, default_image: str = DEFAULT_IMAGE
) -> dict[str, Any]:
    volumes, mounts = _volumes(spec, name)
    command, args = trainer_command(spec, name)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or default_image,
        # torchrun itself (the probe execs it): the failing rank's ExitCode reaches the operator through
        # the termination message (kubetune_trainer.launch, the image's default entrypoint for `docker
        # run`, is not used here: forwarding SIGTERM a second time raced torchrun's shutdown on suspend).
        "command": command,
        "args": args,
        "env": [*_env(spec), {"name": ENV_TRAINER_IMAGE, "value": spec.image or default_image}],
        "ports": [
            {"name": "rendezvous", "containerPort": DEFAULT_RDZV_PORT},
            {"name": "progress", "containerPort": DEFAULT_PROGRESS_PORT},
        ],
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": service_name(name),  # with the Indexed Job's hostname: <job>-<index>.<service>
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,  # to checkpoint after SIGTERM
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,  # pods never talk to the Kubernetes API
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
        "schedulingGates": [
            {"name": GANG_GATE}
        ],  # lifted by the operator: a gang starts whole (module docstring)
    }
    gang = pod_membership(spec, name)
    optional = {
        "nodeSelector": dict(spec.node_selector),
        "tolerations": gang_tolerations(spec),
        "topologySpreadConstraints": spread_constraints(spec, name),
        "affinity": spec.affinity,
        "priorityClassName": spec.priority_class_name,
        "schedulerName": gang.scheduler_name or spec.scheduler_name,
        "serviceAccountName": spec.service_account_name,
        "imagePullSecrets": [{"name": s.name} for s in spec.image_pull_secrets],
    }
    pod.update({k: v for k, v in optional.items() if v})
    labels = {
        **spec.labels,
        **gang.labels,
        **owned_labels(name, "worker"),
        LABEL_ROLE: "worker",
    }
    metadata: dict[str, Any] = {"labels": labels}
    if spec.annotations or gang.annotations:
        metadata["annotations"] = {**spec.annotations, **gang.annotations}
    return {"metadata": metadata, "spec": pod}


# Taints the node lifecycle controller puts on a node that stops answering; a pod that tolerates them for N
# seconds is evicted N seconds after the node was lost (the DefaultTolerationSeconds admission plugin adds 300).
NODE_LOSS_TAINTS: Final = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
HOSTNAME_TOPOLOGY: Final = "kubernetes.io/hostname"


def gang_tolerations(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """The user's tolerations, plus node-loss tolerations of distributed.nodeLossTolerationSeconds for each
    node-loss taint the user does not tolerate already."""
    tolerations = list(spec.tolerations)
    # Kubernetes evicts at the shortest tolerationSeconds among the matching tolerations, so one of ours would
    # cut short a user's own: keys the user tolerates (a keyless Exists tolerates them all) are left alone.
    if any(not t.get("key") and t.get("operator") == "Exists" and t.get("effect") in (None, "", "NoExecute")
           for t in tolerations):  # fmt: skip
        return tolerations
    own = {t.get("key") for t in tolerations}
    seconds = spec.distributed.node_loss_toleration_seconds
    for key in NODE_LOSS_TAINTS:
        if key not in own:
            tolerations.append(
                {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": seconds}
            )
    return tolerations


def spread_constraints(spec: FineTuneJobSpec, name: str) -> list[dict[str, Any]]:
    """One pod per node where there are enough nodes (distributed.spread: nodes). It counts the job's pods: the
    scheduler counts neither terminating pods nor finished ones, and a restarted gang is released only once the
    earlier generation's pods are gone, so only this gang's pods are counted."""
    if spec.distributed.spread != "nodes" or spec.distributed.nodes < 2:
        return []
    gang = selector_labels(name)
    return [
        {
            "maxSkew": 1,
            "topologyKey": HOSTNAME_TOPOLOGY,
            "whenUnsatisfiable": "DoNotSchedule",
            "nodeTaintsPolicy": "Honor",  # a dead (tainted) node is not a domain the gang must spread to
            "labelSelector": {"matchLabels": gang},
        }
    ]


def render_workload(
    spec: FineTuneJobSpec,
    name: str,
    namespace: str,
    labels: dict[str, str] | None = None,
    default_image: str = DEFAULT_IMAGE,
) -> dict[str, Any]:
    """The Indexed batch/v1 Job that runs every gang generation of a run. `labels` are the FineTuneJob's own."""
    job_labels = owned_labels(name, "workload")
    for key in KUEUE_LABELS:  # Kueue admits the Job by unsuspending it, at the priority its label names
        if labels and key in labels:
            job_labels[key] = labels[key]
    nodes = spec.distributed.nodes
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": workload_name(name), "namespace": namespace, "labels": job_labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            # The operator counts restarts (spec.runPolicy.backoffLimit) and restarts the whole gang; the Job
            # controller only replaces the pods the operator removed. podFailurePolicy makes it ignore every
            # pod failure (a trainer's exit code, an eviction or a lost node) and implies podReplacementPolicy
            # Failed: a pod is replaced only once it has stopped. backoffLimit 0 then only fails the Job on a
            # failure no rule matches; the operator starts a new Job then (the fallback, see reconcile.act).
            "backoffLimit": 0,
            "podFailurePolicy": POD_FAILURE_POLICY,
            "suspend": spec.run_policy.suspend,
            "template": render_pod_template(spec, name, default_image),
        },
    }


POD_FAILURE_POLICY: Final = {
    "rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "Ignore", "onExitCodes": {"containerName": CONTAINER, "operator": "NotIn", "values": [0]}},
    ]
}


def render_all(
    spec: FineTuneJobSpec,
    name: str,
    namespace: str,
    uid: str = "",
    labels: dict[str, str] | None = None,
    default_image: str = DEFAULT_IMAGE,
) -> list[dict[str, Any]]:
    """ConfigMap, Service, the PodGroup (with spec.scheduling.gang) and workload Job, in creation order (config,
    DNS and the gang's group before pods)."""
    group = render_pod_group_for(spec, name, namespace)
    return [
        render_config_map(spec, name, namespace, uid),
        render_service(name, namespace),
        *([group] if group is not None else []),
        render_workload(spec, name, namespace, labels, default_image),
    ]


def render_pod_group_for(spec: FineTuneJobSpec, name: str, namespace: str) -> dict[str, Any] | None:
    """The gang scheduler's PodGroup, sized from the trainer container's requests (None without a gang)."""
    requests = dict(_resources(spec).get("requests") or {})
    return render_pod_group(spec, name, namespace, requests)
