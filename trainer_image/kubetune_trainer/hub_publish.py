"""spec.output.publish.huggingface: the finished model (or adapter) and its model card, pushed to a Hub repository.

The client is huggingface_hub's HfApi (create_repo, then upload_folder: one commit). The token comes
from $HF_TOKEN, which the operator fills from the Secret the spec names; it is never logged. Rank 0
checks the token before training (whoami), so a refused token fails the job at once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kubetune.api.contract import ExitCode
from kubetune.api.models import HuggingFacePublish

from kubetune_trainer.errors import TrainerError

ENV_TOKEN = "HF_TOKEN"


def _api(spec: HuggingFacePublish) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=spec.endpoint, token=os.environ.get(ENV_TOKEN) or False)


def _error(spec: HuggingFacePublish, exc: Exception, doing: str) -> TrainerError:
    """A huggingface_hub failure -> one line naming the Secret (refused token) or the endpoint (unreachable)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    where = spec.endpoint or "the Hugging Face Hub"
    if status in (401, 403):
        return TrainerError(ExitCode.CREDENTIALS_INVALID, f"spec.output.publish.huggingface: {where} refused the token in Secret "
                            f"{spec.token_secret!r} (key {ENV_TOKEN}) while {doing}; put a write token for {spec.repo} there")  # fmt: skip
    if status is None:
        return TrainerError(
            ExitCode.INFRASTRUCTURE,
            f"spec.output.publish.huggingface: {where} unreachable while {doing} ({type(exc).__name__})",
        )
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    code = ExitCode.INFRASTRUCTURE if status >= 500 else ExitCode.CONFIG_INVALID
    return TrainerError(
        code, f"spec.output.publish.huggingface: {where} answered {status} while {doing} {spec.repo}: {first}"
    )


def check_access(spec: HuggingFacePublish) -> None:
    """Before training: does the Hub take the token? (whoami; nothing is written.)"""
    if not os.environ.get(ENV_TOKEN):
        raise TrainerError(ExitCode.CREDENTIALS_INVALID, f"spec.output.publish.huggingface: no {ENV_TOKEN} in the environment; "
                           f"the Secret {spec.token_secret!r} needs the key {ENV_TOKEN}")  # fmt: skip
    try:
        _api(spec).whoami()
    except Exception as exc:
        raise _error(spec, exc, "checking the token") from None


def staging(model_dir: Path, card_files: list[Path]) -> Path:
    """A directory with the model's files and the kubetune model card on top (it replaces peft's README.md)."""
    out = Path(tempfile.mkdtemp(prefix="kubetune-hub-"))
    for src in sorted(model_dir.rglob("*")):
        if src.is_file():
            dest = out / src.relative_to(model_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            _link(src, dest)
    for src in card_files:
        if src.is_file():
            (out / src.name).unlink(missing_ok=True)
            _link(src, out / src.name)
    return out


def _link(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def push(spec: HuggingFacePublish, model_dir: Path, card_files: list[Path], message: str) -> str:
    """Create the repository if needed and commit the files; the repository URL at the new commit."""
    api = _api(spec)
    folder = staging(model_dir, card_files)
    try:
        api.create_repo(spec.repo, private=spec.private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=spec.repo, folder_path=str(folder), commit_message=message, repo_type="model"
        )
    except Exception as exc:
        raise _error(spec, exc, "pushing to") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return f"{api.endpoint.rstrip('/')}/{spec.repo}/tree/{info.oid}"
