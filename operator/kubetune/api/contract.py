"""What the operator and the trainer agree on besides TrainerConfig: exit codes, artifact layout, env.

The trainer exits with one of these codes and writes a JSON termination message
({"exitCode", "reason", "message"}) to /dev/termination-log (or
$KUBETUNE_TERMINATION_LOG); the operator reads the code from the pod's
container status to decide whether restarting the gang can help.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    # --- user errors: a restart cannot help; the job fails with the message.
    CONFIG_INVALID = 64
    MODEL_NOT_FOUND = 65
    DATASET_INVALID = 66
    CREDENTIALS_INVALID = 67
    LOSS_NOT_FINITE = 68
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
    }
)

REASONS: dict[int, str] = {
    ExitCode.CONFIG_INVALID: "ConfigInvalid",
    ExitCode.MODEL_NOT_FOUND: "ModelNotFound",
    ExitCode.DATASET_INVALID: "DatasetInvalid",
    ExitCode.CREDENTIALS_INVALID: "CredentialsInvalid",
    ExitCode.LOSS_NOT_FINITE: "LossNotFinite",
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
METRICS_FILE = "metrics.json"
CONFIG_FILE = "trainer-config.yaml"
MANIFEST_FILE = "manifest.json"  # {"files": {relpath: {"sha256", "size"}}, ...}
COMPLETE_MARKER = "COMPLETE"  # written last: its presence means everything above is complete


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


# --- environment the pods get (besides torchrun's) ----------------------------
ENV_CONFIG_PATH = "KUBETUNE_CONFIG"  # path of the mounted trainer-config.yaml
ENV_TERMINATION_LOG = "KUBETUNE_TERMINATION_LOG"
ENV_CACHE_DIR = "KUBETUNE_CACHE_DIR"  # node-local cache for model downloads and tokenized data
