"""Names and labels shared by the operator, the CLI/SDK and the e2e suite: what render writes on the
objects a FineTuneJob owns and what status, the controller and the clients read back. Pure constants and
name functions; kubetune.render builds objects with them, nothing here depends on render.
"""

from __future__ import annotations

from typing import Final

from kubetune import __version__

LABEL_JOB: Final = "kubetune.io/job-name"
"""On every object and pod a FineTuneJob owns (not on what serves it): the FineTuneJob's name."""
LABEL_RESTART: Final = "kubetune.io/restart"
"""On the gang's pods: their gang generation (status.restarts when the operator released them). The Job's pod
template cannot carry it (the template of a running Job is immutable, and one Job serves every generation): the
operator sets it when it lifts GANG_GATE."""
GANG_GATE: Final = "kubetune.io/gang"
"""The scheduling gate on every pod of the workload Job. The operator lifts it (and labels the pod with its
generation) once a pod exists for every rank and no pod of an earlier generation is left, so that a restarted
gang never starts beside the end of the last one."""
ANNOTATION_RELEASED: Final = "kubetune.io/released-at"
"""On a gang's pod: when the operator lifted GANG_GATE (spec.scheduling.gang.scheduleTimeoutSeconds counts from
it)."""
LABEL_ROLE: Final = "kubetune.io/role"
"""worker (a trainer pod) or serving (the served model's object and pods)."""
LABEL_SERVING: Final = "kubetune.io/serving"
"""On the served object and its pods instead of LABEL_JOB: KServe copies an InferenceService's labels onto
its pods, and pods with LABEL_JOB are counted as the job's gang."""
LABEL_QUEUE: Final = "kueue.x-k8s.io/queue-name"
"""Kueue's queue label: copied from the FineTuneJob to its workload Job (Kueue admits the Job)."""
LABEL_PRIORITY: Final = "kueue.x-k8s.io/priority-class"
"""Kueue's WorkloadPriorityClass label: copied from the FineTuneJob to its workload Job like LABEL_QUEUE."""
KUEUE_LABELS: Final = (LABEL_QUEUE, LABEL_PRIORITY)
MANAGED_BY: Final = {"app.kubernetes.io/managed-by": "kubetune", "app.kubernetes.io/part-of": "kubetune"}
APP_TRAINER: Final = "kubetune-trainer"
"""app.kubernetes.io/name of what a FineTuneJob owns for training (not `kubetune`: the chart's operator pods
select on name=kubetune and instance=<release>, which a job named like the release would otherwise match)."""
APP_OPERATOR: Final = "kubetune"
"""app.kubernetes.io/name of the operator's own objects (its leader Lease), as the chart names the operator."""
APP_SERVING: Final = "kubetune-serving"
"""app.kubernetes.io/name of the object that serves a job's model, and its pods."""

COMPLETION_INDEX: Final = "batch.kubernetes.io/job-completion-index"
"""The Job controller's annotation on each pod: its index, i.e. the node rank."""
JOB_UID_LABEL: Final = "batch.kubernetes.io/controller-uid"
"""The Job controller's label on each pod: its Job's uid (tells two Jobs of the same name apart)."""
ANNOTATION_MODEL: Final = "kubetune.io/model-uri"
"""On the served object: the model URI it serves (a later run's model replaces it)."""
ANNOTATION_SUSPEND_APPLIED: Final = "kubetune.io/suspend"
"""On the workload Job: the spec.runPolicy.suspend the operator last applied to it. The operator changes the
Job's suspend only when the spec's value differs from it, so a queue (Kueue) that suspends or unsuspends the
Job itself is never fought."""
ANNOTATION_DEFERRED: Final = "kubetune.io/deferred"
"""On a workload Job created suspended: the children it names (ConfigMap, Service) are not created yet. They
are created when the Job is admitted (resumed by the operator or unsuspended by a queue), then the annotation
is removed. A queued job costs one write (its Job) instead of three, and no endpoint objects."""

CONTAINER: Final = "trainer"
"""The trainer container's name in every worker pod."""
DEFAULT_IMAGE: Final = f"ghcr.io/kubetune/trainer:{__version__}"  # the release that built this operator
"""The trainer image for FineTuneJobs that set no spec.image (KUBETUNE_TRAINER_IMAGE overrides it)."""


def config_map_name(name: str) -> str:
    return f"{name}-config"


def service_name(name: str) -> str:
    return name


def workload_name(name: str) -> str:
    """The workload Job: one per run, restarted in place (its pods are replaced, the Job and so its Kueue Workload
    stay). The `-r0` suffix is from when each gang restart had a Job of its own (`-r<n>`)."""
    return f"{name}-r0"


def master_addr(name: str) -> str:
    """Rank 0's DNS name: the Indexed Job's pod hostname under the headless Service."""
    return f"{workload_name(name)}-0.{service_name(name)}"


def selector_labels(name: str) -> dict[str, str]:
    return {LABEL_JOB: name}


def standard_labels(instance: str, component: str, app: str = APP_TRAINER) -> dict[str, str]:
    """Kubernetes' recommended labels (app.kubernetes.io/name, instance, component, part-of, managed-by), on
    every object the operator creates: `instance` is the FineTuneJob's name, `component` what the object is
    (config, rendezvous, workload, worker, gang, serving)."""
    return {"app.kubernetes.io/name": app, "app.kubernetes.io/instance": instance,
            "app.kubernetes.io/component": component, **MANAGED_BY}  # fmt: skip
