"""What the controller needs from the Kubernetes API, as an interface: `KubeClient` (kube.py) speaks to a real
API server; tests pass a fake that keeps objects in memory and records each call (tests/fake_cluster.py).

Every method speaks plain dicts. The failure modes are part of the interface: a missing object is None where
that is an answer (a Job already gone), an object that already exists is None from `create_if_absent`, a
request the API server refuses is `kopf.PermanentError`, anything else that fails is `kopf.TemporaryError`
(the work queue tries again later), and a kind the API server does not serve is `ApiMissing`.
"""

from __future__ import annotations

from typing import Any, Protocol


class ApiMissing(Exception):
    """The API server does not serve the object's kind (e.g. KServe's CRDs are not installed)."""


class Cluster(Protocol):
    """The controller's reads and writes beyond the watch cache (Jobs and Pods are read from the Store)."""

    @property
    def calls(self) -> int:
        """API requests made so far (the operator's stats log line)."""
        ...

    @property
    def throttled_ms(self) -> int:
        """Milliseconds requests waited for the client-side QPS limit."""
        ...

    def create_if_absent(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Create `obj`; the created object, or None when one of that name already exists."""
        ...

    def read_serving(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """The InferenceService or Deployment named like `obj`, or None when there is none."""
        ...

    def replace_serving(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Replace the InferenceService or Deployment (`obj` carries the resourceVersion read)."""
        ...

    def delete_job(self, namespace: str, name: str, propagation: str = "Foreground") -> dict[str, Any] | None:
        """Delete a workload Job; the Job as the delete left it (while its pods go), or None when it is gone."""
        ...

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the workload Job; the patched Job, or None when there is none."""
        ...

    def delete_pod(
        self, namespace: str, name: str, grace_seconds: int | None = None
    ) -> dict[str, Any] | None:
        """Delete a pod of the gang (with its grace period: the trainer checkpoints on SIGTERM; `grace_seconds`
        overrides it: reconcile.AT_ONCE for a pod with nothing to save); the pod as the delete left it (terminating), or None
        when it is gone."""
        ...

    def fail_pod(self, namespace: str, name: str, reason: str, message: str) -> dict[str, Any] | None:
        """Mark a pod lost with its node Failed (its status), as the pod garbage collector does for a node that is
        gone: its kubelet will never finish it, and the Job controller replaces a pod only once it has stopped.
        The pod as written, or None when it is gone."""
        ...

    def release_pod(
        self, namespace: str, name: str, gate: str, labels: dict[str, str], annotations: dict[str, str]
    ) -> dict[str, Any] | None:
        """Lift the scheduling gate `gate` from a pod (other gates stay) and set `labels` and `annotations` on it,
        in one request; the pod as written, or None when it is gone."""
        ...

    def patch_config_map(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """Merge-patch a ConfigMap."""
        ...

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch a FineTuneJob's status; the object as written, or None when it is gone."""
        ...

    def delete_finetunejob(self, namespace: str, name: str) -> None:
        """Delete a FineTuneJob (its children go with it, by owner references)."""
        ...

    def post_event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Record an Event on the FineTuneJob `body`. Never raises, never waits for the API server."""
        ...

    def request_checkpoint(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        """POST rank 0's checkpoint endpoint (kubetune.api.contract.CHECKPOINT_PATH, on the pod's progress port: the
        pod itself, not the API server); the trainer's answer ({"requested": n, "step": s}), or None when it cannot
        be reached. Never raises, waits at most a few seconds."""
        ...

    def flush_events(self, timeout: float) -> bool:
        """Wait until the Events recorded so far are posted; False if some still wait after `timeout` seconds."""
        ...
