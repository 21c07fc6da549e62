"""An in-memory `Cluster` (kubetune.controller.cluster) for the controller's tests, in the manner of
controller-runtime's fake client: objects live in a dict, each call is recorded, and each answers as the API
server would (uid and resourceVersion on create, 409 on a second create, merge patches, 404 as None where the
interface says so). Nothing here decides for the controller: the tests assert on the calls it made."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any

import kopf
from kubetune.controller.cluster import ApiMissing

Ref = tuple[str, str, str]
"""(kind, namespace, name)."""


@dataclass(frozen=True)
class Call:
    """One request: verb (create, patch, delete, read, replace, event), kind, name; `body` is what was sent
    (the object, the patch, or the Event's (type, reason, message)); `outcome` what the fake answered."""

    verb: str
    kind: str
    name: str
    body: Any = None
    outcome: str = "ok"

    @property
    def short(self) -> tuple[str, str, str]:
        return (self.verb, self.kind, self.name)


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch (what `kubectl patch --type merge` and the client's dict patches do)."""
    out = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_patch(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class FakeCluster:
    """Holds objects by (kind, namespace, name); `requests` lists every request in order."""

    def __init__(
        self, *objects: dict[str, Any], unserved: tuple[str, ...] = (), refuse: tuple[str, ...] = ()
    ) -> None:
        self.objects: dict[Ref, dict[str, Any]] = {}
        self.requests: list[Call] = []
        self.unserved = set(unserved)  # kinds whose API is not installed (KServe's InferenceService)
        self.refuse = set(refuse)  # kinds the API server refuses (an admission webhook, a bad field)
        self._rv = itertools.count(100)
        self._uid = itertools.count(1)
        self.throttled_ms = 0
        self.trainer_requests = 0  # POST /checkpoint answered by rank 0; None answers: unreachable
        self.trainer_reachable = True
        for obj in objects:
            self.put(obj)

    # ------------------------------------------------------------ test helpers

    @property
    def calls(self) -> int:
        return len(self.requests)

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Store `obj` as if someone else (a user, the Job controller) had written it."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{obj['kind'].lower()}-{next(self._uid)}")
        meta["resourceVersion"] = str(next(self._rv))
        self.objects[(obj["kind"], meta.get("namespace", ""), meta["name"])] = obj
        return copy.deepcopy(obj)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self.objects.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for (k, _, _), o in sorted(self.objects.items()) if k == kind]

    def writes(self) -> list[tuple[str, str, str]]:
        """(verb, kind, name) of every request but reads, in order."""
        return [c.short for c in self.requests if c.verb != "read"]

    def events(self) -> list[tuple[str, str, str]]:
        return [c.body for c in self.requests if c.verb == "event"]

    def forget_calls(self) -> None:
        self.requests.clear()

    def _record(self, verb: str, kind: str, name: str, body: Any = None, outcome: str = "ok") -> None:
        self.requests.append(Call(verb, kind, name, copy.deepcopy(body), outcome))

    # ------------------------------------------------------------ the Cluster interface

    def create_if_absent(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        kind, meta = obj["kind"], obj["metadata"]
        ref = (kind, meta["namespace"], meta["name"])
        if kind in self.unserved:
            self._record("create", kind, meta["name"], obj, "404")
            raise ApiMissing(obj["apiVersion"])
        if kind in self.refuse:
            self._record("create", kind, meta["name"], obj, "422")
            raise kopf.PermanentError(
                f"create {kind} {meta['name']} refused by the API server: refused by the test"
            )
        if ref in self.objects:
            self._record("create", kind, meta["name"], obj, "409")
            return None
        self._record("create", kind, meta["name"], obj)
        return self.put(obj)

    def read_serving(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        meta = obj["metadata"]
        self._record("read", obj["kind"], meta["name"])
        return self.get(obj["kind"], meta["namespace"], meta["name"])

    def replace_serving(self, obj: dict[str, Any]) -> dict[str, Any]:
        kind, meta = obj["kind"], obj["metadata"]
        old = self.objects.get((kind, meta["namespace"], meta["name"]))
        if old is None or old["metadata"]["resourceVersion"] != meta.get("resourceVersion"):
            self._record("replace", kind, meta["name"], obj, "409")
            raise kopf.TemporaryError(f"replace {kind} {meta['name']}: 409 Conflict", delay=10)
        self._record("replace", kind, meta["name"], obj)
        new = copy.deepcopy(obj)
        new["metadata"]["uid"] = old["metadata"]["uid"]
        return self.put(new)

    def delete_job(self, namespace: str, name: str, propagation: str = "Foreground") -> dict[str, Any] | None:
        ref = ("Job", namespace, name)
        if ref not in self.objects:
            self._record("delete", "Job", name, propagation, "404")
            return None
        self._record("delete", "Job", name, propagation)
        if (
            propagation == "Foreground"
        ):  # kept, with a finalizer, until the garbage collector has removed its pods
            job = self.objects[ref]
            job["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
            job["metadata"]["finalizers"] = ["foregroundDeletion"]
            return self.put(job)
        del self.objects[ref]  # Background: a Job has no finalizer of its own; it is gone at once
        return None

    def delete_pod(
        self, namespace: str, name: str, grace_seconds: int | None = None
    ) -> dict[str, Any] | None:
        """Graceful: the pod stays, terminating, until the kubelet has stopped it (`World.kubelet_stops`); the
        request's body is {"gracePeriodSeconds": grace_seconds} when one is given."""
        ref = ("Pod", namespace, name)
        body = None if grace_seconds is None else {"gracePeriodSeconds": grace_seconds}
        if ref not in self.objects:
            self._record("delete", "Pod", name, body, "404")
            return None
        self._record("delete", "Pod", name, body)
        pod = self.objects[ref]
        pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return self.put(pod)

    def fail_pod(self, namespace: str, name: str, reason: str, message: str) -> dict[str, Any] | None:
        ref = ("Pod", namespace, name)
        if ref not in self.objects:
            self._record("fail", "Pod", name, message, "404")
            return None
        self._record("fail", "Pod", name, message)
        pod = copy.deepcopy(self.objects[ref])
        pod.setdefault("status", {}).update({"phase": "Failed", "reason": reason, "message": message})
        return self.put(pod)

    def release_pod(
        self, namespace: str, name: str, gate: str, labels: dict[str, str], annotations: dict[str, str]
    ) -> dict[str, Any] | None:
        ref = ("Pod", namespace, name)
        body = {"gate": gate, "labels": labels, "annotations": annotations}
        if ref not in self.objects:
            self._record("release", "Pod", name, body, "404")
            return None
        self._record("release", "Pod", name, body)
        pod = copy.deepcopy(self.objects[ref])
        meta = pod["metadata"]
        meta["labels"] = {**(meta.get("labels") or {}), **labels}
        meta["annotations"] = {**(meta.get("annotations") or {}), **annotations}
        gates = [g for g in pod["spec"].get("schedulingGates") or [] if g["name"] != gate]
        pod["spec"]["schedulingGates"] = gates
        if not gates:
            del pod["spec"]["schedulingGates"]
        return self.put(pod)

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        return self._patch("Job", namespace, name, patch)

    def patch_config_map(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        if self._patch("ConfigMap", namespace, name, patch) is None:
            raise kopf.TemporaryError(f"patch ConfigMap {name}: 404 Not Found", delay=10)

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        return self._patch("FineTuneJob", namespace, name, {"status": status}, verb="patch-status")

    def _patch(
        self, kind: str, namespace: str, name: str, patch: dict[str, Any], verb: str = "patch"
    ) -> dict[str, Any] | None:
        ref = (kind, namespace, name)
        if ref not in self.objects:
            self._record(verb, kind, name, patch, "404")
            return None
        self._record(verb, kind, name, patch)
        return self.put(merge_patch(self.objects[ref], patch))

    def delete_finetunejob(self, namespace: str, name: str) -> None:
        gone = self.objects.pop(("FineTuneJob", namespace, name), None)
        self._record("delete", "FineTuneJob", name, None, "ok" if gone else "404")

    def post_event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self._record("event", "FineTuneJob", body["metadata"]["name"], (type_, reason, message))

    def request_checkpoint(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        """Rank 0's answer to POST /checkpoint (a new request number each time, or None when unreachable)."""
        name = pod["metadata"]["name"]
        if not self.trainer_reachable:
            self._record("checkpoint", "Pod", name, None, "unreachable")
            return None
        self.trainer_requests += 1
        self._record("checkpoint", "Pod", name)
        return {"requested": self.trainer_requests, "step": 0}

    def flush_events(self, timeout: float) -> bool:
        return True
