"""Pure parts of the SDK: reading a job from what a user hands us, and reading what the API returns."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from kubetune.api.manifest_yaml import ManifestError, load_documents, read_text
from kubetune.api.models import KIND, Artifacts, FineTuneJob, FineTuneJobStatus, ObjectMeta, Progress
from kubetune.api.validation import Problem, SpecInvalid, validate_manifest
from kubetune.status.derive import TERMINAL, artifacts

JobSource = FineTuneJob | dict[str, Any] | str | os.PathLike[str]
"""What `submit` accepts: a model, a manifest dict, or the path of a YAML file."""
JobList = list[FineTuneJob]
Events = list[dict[str, Any]]


def manifest_of(job: JobSource) -> dict[str, Any]:
    """The wire-form manifest (camelCase dict) of a model, a dict or a YAML file's first FineTuneJob."""
    if isinstance(job, FineTuneJob):
        return job.model_dump(by_alias=True, exclude_none=True, mode="json", exclude={"status"})
    if isinstance(job, dict):
        return {k: v for k, v in job.items() if k != "status"}
    path = str(job)
    try:
        docs = load_documents(read_text(path))  # the bounded loader `kubetune validate` uses
    except ManifestError as exc:
        raise SpecInvalid([Problem(path, str(exc))]) from None
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == KIND:
            return {k: v for k, v in doc.items() if k != "status"}
    raise SpecInvalid([Problem(path, f"no {KIND} document in this file; add `kind: {KIND}`")])


def checked(job: JobSource, namespace: str | None = None) -> dict[str, Any]:
    """The manifest to create, after the one validation function: SpecInvalid lists every problem."""
    doc = manifest_of(job)
    doc.setdefault("apiVersion", "kubetune.io/v1alpha1")
    doc.setdefault("kind", KIND)
    meta = dict(doc.get("metadata") or {})
    if namespace and not meta.get("namespace"):
        meta["namespace"] = namespace
    doc["metadata"] = meta
    _, problems = validate_manifest(doc)
    if problems:
        raise SpecInvalid(problems)
    return doc


def from_object(obj: dict[str, Any]) -> FineTuneJob:
    """A FineTuneJob as the API server returns it (defaults filled in, status possibly partial)."""
    try:
        return FineTuneJob.model_validate(obj)
    except ValidationError:
        # A spec the operator refused still has a status worth showing: keep the spec unparsed.
        status = obj.get("status")
        return FineTuneJob.model_construct(
            api_version=obj.get("apiVersion"), kind=obj.get("kind"),
            metadata=ObjectMeta.model_validate(obj.get("metadata") or {}),
            spec=obj.get("spec"),
            status=FineTuneJobStatus.model_validate(status) if isinstance(status, dict) else None,
        )  # fmt: skip


def phase_of(job: FineTuneJob) -> str:
    return (job.status.phase if job.status else None) or "Pending"


def is_finished(job: FineTuneJob) -> bool:
    return phase_of(job) in TERMINAL


def progress_of(job: FineTuneJob) -> Progress | None:
    return job.status.progress if job.status else None


def new_progress(previous: Progress | None, current: Progress | None) -> bool:
    """Whether `current` is an update worth reporting (a new reading, not the same one again)."""
    if current is None:
        return False
    if previous is None:
        return True
    return current.model_dump(exclude={"updated_at", "eta"}) != previous.model_dump(
        exclude={"updated_at", "eta"}
    )


def phases(until: str | Iterable[str]) -> frozenset[str]:
    return frozenset([until] if isinstance(until, str) else until)


def artifacts_of(job: FineTuneJob) -> Artifacts:
    """The status' artifact URIs, or where they will be (from spec.output.uri) before the job succeeds."""
    if job.status and job.status.artifacts:
        return job.status.artifacts
    return artifacts(job.spec)
