"""Everything the operator and the trainer agree on besides TrainerConfig, each item once: exit
codes, trainer phases, the progress report, the termination message, artifact layout, paths, env.

The trainer exits with one of these codes and writes a TerminationMessage to
TERMINATION_LOG (or $KUBETUNE_TERMINATION_LOG); the operator reads it from the pod's
container status to decide whether restarting the gang can help.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any, Final

from pydantic import ConfigDict, Field, ValidationError

from kubetune.api.models import ApiModel, Artifacts, CheckpointRecord, EvaluationResult, TrainerReport
from kubetune.api.storage import sha256_file


class ExitCode(IntEnum):
    OK = 0
    # --- user errors: a restart cannot help; the job fails with the message.
    CONFIG_INVALID = 64
    MODEL_NOT_FOUND = 65
    DATASET_INVALID = 66
    CREDENTIALS_INVALID = 67
    LOSS_NOT_FINITE = 68
    EVALUATION_GATE_FAILED = (
        69  # the final model missed a spec.evaluation.gate threshold: training again gives the same model
    )
    CHECKPOINT_INVALID = (
        71  # checkpoints exist but none passed verification against its manifest (each is set aside)
    )
    NETWORK_UNREACHABLE = (
        72  # a rank cannot reach a peer (rendezvous port or the backend's): the network must change
    )
    # --- infrastructure errors: a restart from the last checkpoint may help.
    INFRASTRUCTURE = 75
    STORAGE_UNAVAILABLE = 76
    STALLED = 77  # no optimizer step for runPolicy.progressDeadlineSeconds (the rank's own watchdog)
    # --- stopped by SIGTERM after writing a checkpoint (pod deleted, node drained, suspend).
    PREEMPTED = 143


USER_ERRORS = frozenset(
    {
        ExitCode.CONFIG_INVALID,
        ExitCode.MODEL_NOT_FOUND,
        ExitCode.DATASET_INVALID,
        ExitCode.CREDENTIALS_INVALID,
        ExitCode.LOSS_NOT_FINITE,
        ExitCode.EVALUATION_GATE_FAILED,
        ExitCode.CHECKPOINT_INVALID,
        ExitCode.NETWORK_UNREACHABLE,
    }
)

REASONS: dict[int, str] = {
    ExitCode.CONFIG_INVALID: "ConfigInvalid",
    ExitCode.MODEL_NOT_FOUND: "ModelNotFound",
    ExitCode.DATASET_INVALID: "DatasetInvalid",
    ExitCode.CREDENTIALS_INVALID: "CredentialsInvalid",
    ExitCode.LOSS_NOT_FINITE: "LossNotFinite",
    ExitCode.EVALUATION_GATE_FAILED: "EvaluationGateFailed",
    ExitCode.CHECKPOINT_INVALID: "CheckpointInvalid",
    ExitCode.NETWORK_UNREACHABLE: "NetworkUnreachable",
    ExitCode.INFRASTRUCTURE: "InfrastructureError",
    ExitCode.STORAGE_UNAVAILABLE: "StorageUnavailable",
    ExitCode.STALLED: "Stalled",
    ExitCode.PREEMPTED: "Preempted",
}


def is_retryable(exit_code: int) -> bool:
    """Whether restarting the gang from the last checkpoint may help."""
    return exit_code not in USER_ERRORS


# --- artifact layout under spec.output.uri ------------------------------------
CHECKPOINTS_DIR = "checkpoints"  # checkpoints/step-00000100/ ... each with manifest.json and COMPLETE
CHECKPOINT_PREFIX = "step-"
ADAPTER_DIR = "adapter"  # PEFT adapter (LoRA): PeftModel.from_pretrained(base, <uri>/adapter)
MERGED_DIR = "model"  # full weights (merged LoRA or full FT), safetensors + tokenizer
INTERPOLATION_DIR = "interpolation"  # WiSE-FT mixes: interpolation/alpha-0.50/ ... (spec.output.interpolate)
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"  # the model card, drawn from metrics.json (kubetune report shows it)
LOSS_PLOT = "loss.png"  # training (and eval) loss by step
EVAL_PLOT = "eval.png"  # eval loss by step, before training at step 0 (and the interpolation sweep)
CONFIG_FILE = "trainer-config.yaml"
MANIFEST_FILE = "manifest.json"  # an ArtifactManifest (below)
COMPLETE_MARKER = "COMPLETE"  # written last: its presence means everything above is complete
GATE_FAILED_MARKER = (
    "GATE_FAILED"  # beside COMPLETE when the model missed spec.evaluation.gate: a rerun fails again
)
OWNER_FILE = (
    ".kubetune-owner.json"  # the first file written: which job (uid, run) or local run owns the output
)
OUTPUT_LOCK = ".kubetune.lock"  # a local output's lock, held by rank 0 while it trains (filelock)


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


class FileEntry(ApiModel):
    """One file of a published directory: its sha256 (hex) and size in bytes."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class ManifestMismatch(ValueError):
    """A file is missing or its bytes differ from the manifest; the message names the file."""


class ArtifactManifest(ApiModel):
    """manifest.json: every file of a published directory (the output, or one checkpoint) with its sha256 and
    size, written after the files and before COMPLETE. Readers check what they load against it."""

    model_config = ConfigDict(extra="ignore")  # a newer trainer's extra fields do not make a reader refuse it

    files: dict[str, FileEntry]
    """Path relative to the directory -> its digest and size (the COMPLETE marker and manifest.json excluded)."""
    created_at: str | None = None
    """UTC, RFC 3339 (seconds)."""
    job: str | None = None
    """The FineTuneJob that wrote it (the output's manifest)."""
    step: int | None = None
    """The optimizer step it was written at."""

    @classmethod
    def of(cls, directory: Path, only: Iterable[str] | None = None, **fields: Any) -> ArtifactManifest:
        """The manifest of the files under `directory` (or of the `only` ones), stamped now."""
        paths = [directory / rel for rel in only] if only is not None else sorted(directory.rglob("*"))
        files = {
            p.relative_to(directory).as_posix(): FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
            for p in paths
            if p.is_file() and not (p.parent == directory and p.name in (COMPLETE_MARKER, MANIFEST_FILE))
        }
        return cls(files=files, created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields)

    def to_text(self) -> str:
        return json.dumps(
            self.model_dump(by_alias=True, mode="json", exclude_none=True), indent=2, sort_keys=True
        )

    @classmethod
    def parse(cls, text: str | bytes) -> ArtifactManifest:
        """The manifest in `text`; ManifestMismatch when it is not one (a reader must not trust such a directory)."""
        try:
            return cls.model_validate(json.loads(text))
        except (ValueError, ValidationError) as exc:
            raise ManifestMismatch(
                f"{MANIFEST_FILE} is not a valid manifest: {str(exc).splitlines()[0]}"
            ) from exc

    def verify(
        self, root: Path, only: Iterable[str] | None = None, exact: bool = False, threads: int = 8
    ) -> int:
        """Check the files under `root` against the manifest: every listed file (or, given `only`, those of them
        that are listed) must exist with its size and sha256; with `exact`, no other file may be there (a
        checkpoint's loader reads files by pattern). Every size is checked before any file is hashed; files hash
        in `threads` threads (hashlib releases the GIL), largest first. The number checked; ManifestMismatch
        naming the first file that is missing, unlisted or differs."""
        names = sorted(self.files) if only is None else sorted(n for n in only if n in self.files)
        for rel in names:
            want, path = self.files[rel], root / rel
            if not path.is_file():
                raise ManifestMismatch(f"{rel}: listed in {MANIFEST_FILE} but missing")
            if (size := path.stat().st_size) != want.size:
                raise ManifestMismatch(
                    f"{rel}: content differs from {MANIFEST_FILE} (size {size}, listed {want.size})"
                )
        if exact:
            present = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
            if extra := sorted(
                rel
                for rel in present
                if rel not in self.files and rel not in (COMPLETE_MARKER, MANIFEST_FILE)
            ):
                raise ManifestMismatch(f"{extra[0]}: not listed in {MANIFEST_FILE}")
        largest_first = sorted(names, key=lambda rel: -self.files[rel].size)
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(names)))) as pool:
            digests = dict(
                zip(largest_first, pool.map(lambda rel: sha256_file(root / rel), largest_first), strict=True)
            )
        if bad := [rel for rel in names if digests[rel] != self.files[rel].sha256]:
            raise ManifestMismatch(
                f"{bad[0]}: content differs from {MANIFEST_FILE} (sha256)"
                + (f"; and {len(bad) - 1} more" if len(bad) > 1 else "")
            )
        return len(names)


# --- `kubetune run`'s work directory (--work-dir): what the local SDK reads back ------
RUN_CONFIG_FILE: Final = (
    CONFIG_FILE  # the trainer config it started torchrun with (progressPort: where rank 0 serves)
)
RUN_LOG_FILE: Final = "train.log"  # every rank's output
RUN_TERMINATION_FILE: Final = (
    "termination-log"  # the failing rank's TerminationMessage ($KUBETUNE_TERMINATION_LOG)
)


# --- paths and environment the pods get (besides torchrun's) ------------------
ENV_CONFIG_PATH: Final = "KUBETUNE_CONFIG"  # path of the mounted trainer-config.yaml
ENV_TERMINATION_LOG: Final = "KUBETUNE_TERMINATION_LOG"  # where the trainer writes its TerminationMessage
ENV_CACHE_DIR: Final = "KUBETUNE_CACHE_DIR"  # node-local cache for model downloads and tokenized data
ENV_PVC_ROOT: Final = "KUBETUNE_PVC_ROOT"  # where pvc://claim/path URIs are mounted: <root>/claim/path
ENV_POD_NAME: Final = (
    "KUBETUNE_POD_NAME"  # the pod's own name (downward API): network failures name both pods
)
ENV_TRAINER_IMAGE: Final = (
    "KUBETUNE_TRAINER_IMAGE"  # the image reference the pod runs, for the model's lineage
)
TERMINATION_LOG: Final = "/dev/termination-log"  # the container's terminationMessagePath
PVC_ROOT: Final = "/mnt/pvc"  # the default of $KUBETUNE_PVC_ROOT, and where the operator mounts claims
CONFIG_MOUNT_DIR: Final = "/etc/kubetune"  # the job's ConfigMap, mounted read-only
CONFIG_PATH: Final = f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE}"  # the default of $KUBETUNE_CONFIG
CACHE_MOUNT_DIR: Final = "/var/cache/kubetune"  # the pod's $KUBETUNE_CACHE_DIR (an emptyDir)
# spec.output.publish.credentialsSecret (a dockerconfigjson Secret), mounted read-only; the env var names the
# file, so the credentials themselves are never in env or logs.
ENV_REGISTRY_AUTH: Final = "KUBETUNE_REGISTRY_AUTH"
REGISTRY_AUTH_DIR: Final = "/var/run/kubetune/registry"
REGISTRY_AUTH_FILE: Final = "config.json"
REGISTRY_AUTH_PATH: Final = f"{REGISTRY_AUTH_DIR}/{REGISTRY_AUTH_FILE}"


# --- what rank 0 reports ---------------------------------------------------------


class TrainerPhase(str, Enum):
    """What rank 0 is doing (ProgressReport.phase, status.progress.trainerPhase)."""

    INITIALIZING = "Initializing"  # fetching the model, tokenizing, resuming: no optimizer step yet
    TRAINING = "Training"
    EVALUATING = "Evaluating"
    SAVING = "Saving"  # a checkpoint or the final artifacts
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class ProgressReport(TrainerReport):
    """Rank 0's GET /progress body (camelCase JSON), and the final one in its TerminationMessage."""

    phase: TrainerPhase = TrainerPhase.INITIALIZING
    last_checkpoint: CheckpointRecord | None = None
    """The newest checkpoint this gang sealed (status.lastCheckpoint)."""
    checkpoint_requests: int | None = None
    """Checkpoint requests (POST CHECKPOINT_PATH) served so far: each one served is a checkpoint all ranks wrote."""

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")


# --- asking rank 0 for a checkpoint ------------------------------------------------

CHECKPOINT_PATH: Final = "/checkpoint"
"""POST on rank 0's progress port: checkpoint at the next optimizer step boundary. Rank 0 answers 202 with
{"requested": n, "step": s} at once; all ranks learn of it in the step's flags all-reduce and write the checkpoint
together; /progress then shows `checkpointRequests` >= n and `lastCheckpoint.step` > s. Repeating a request
before it is served asks for nothing more (one checkpoint)."""


# --- the termination message: the trainer writes it, the operator reads it --------

MESSAGE_LIMIT: Final = 2500
"""Kubernetes keeps at most 4096 bytes of a termination message; the text is cut to leave room."""


def clip_message(message: str) -> str:
    """At most MESSAGE_LIMIT characters: the start (what failed) and the end (the detail), the middle elided."""
    if len(message) <= MESSAGE_LIMIT:
        return message
    half = (MESSAGE_LIMIT - 5) // 2
    return f"{message[:half]} ... {message[-half:]}"


class TerminationMessage(ApiModel):
    """The JSON a rank leaves in TERMINATION_LOG when it exits."""

    exit_code: int
    reason: str
    message: str
    progress: dict[str, Any] | None = None
    """Rank 0's final ProgressReport (non-null fields) when training finished."""
    artifacts: Artifacts | None = None
    """What rank 0 wrote beyond the fixed layout under spec.output.uri: the digest-pinned OCI reference it pushed."""
    evaluation: EvaluationResult | None = None
    """Rank 0's evaluation of the final model (spec.evaluation), passed or not: the operator copies it to status.evaluation."""

    @classmethod
    def build(
        cls,
        exit_code: int,
        message: str,
        progress: ProgressReport | None = None,
        artifacts: Artifacts | None = None,
        evaluation: EvaluationResult | None = None,
    ) -> TerminationMessage:
        reason = REASONS.get(exit_code, "Succeeded" if exit_code == 0 else "Error")
        final = progress.model_dump(by_alias=True, mode="json", exclude_none=True) if progress else None
        return cls(
            exit_code=int(exit_code), reason=reason, message=clip_message(message), progress=final, artifacts=artifacts,
            evaluation=evaluation,
        )  # fmt: skip

    def to_text(self) -> str:
        return json.dumps(self.model_dump(by_alias=True, mode="json", exclude_none=True))

    @classmethod
    def parse(cls, text: str | None) -> TerminationMessage | None:
        """The message in `text`, or None when it is not one (a plain log tail, say)."""
        raw = (text or "").strip()
        if not raw.startswith("{"):
            return None
        try:
            return cls.model_validate(json.loads(raw))
        except (ValueError, ValidationError):
            return None

    @classmethod
    def read(cls, path: Path) -> TerminationMessage | None:
        try:
            return cls.parse(path.read_text())
        except OSError:
            return None
