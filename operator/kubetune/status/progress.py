"""Read rank 0's progress endpoint and map it to status.progress.

The trainer serves `GET /progress` on rank 0: a kubetune.api.contract.ProgressReport as
camelCase JSON. Reading it is best effort: a pod that is starting, busy or gone simply
has no progress this time, and a value that cannot be shown is dropped.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from pydantic import ValidationError

from kubetune.api.contract import CHECKPOINT_PATH
from kubetune.api.models import NetworkReport, Progress, TrackingStatus, TrainingMetrics
from kubetune.api.trainer_config import DEFAULT_PROGRESS_PORT


def progress_url(pod_ip: str, port: int = DEFAULT_PROGRESS_PORT) -> str:
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return f"http://{host}:{port}/progress"


def fetch_progress(
    pod_ip: str, port: int = DEFAULT_PROGRESS_PORT, timeout: float = 2.0
) -> dict[str, Any] | None:
    """The trainer's JSON, or None when it cannot be read (never raises for network trouble)."""
    try:
        with urllib.request.urlopen(progress_url(pod_ip, port), timeout=timeout) as resp:  # noqa: S310 (pod IP, http)
            data = json.loads(resp.read(1 << 20))
    except (OSError, urllib.error.URLError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def request_checkpoint(
    pod: dict[str, Any], port: int = DEFAULT_PROGRESS_PORT, timeout: float = 3.0
) -> dict[str, Any] | None:
    """POST rank 0's checkpoint endpoint (contract.CHECKPOINT_PATH); its JSON answer, or None when it cannot be reached."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    url = progress_url(ip, port).rsplit("/", 1)[0] + CHECKPOINT_PATH
    try:
        request = urllib.request.Request(url, data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 (pod IP, http)
            data = json.loads(resp.read(1 << 16))
    except (OSError, urllib.error.URLError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def format_eta(seconds: float | None) -> str | None:
    if seconds is None or seconds < 0:
        return None
    s = int(seconds)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{sec:02d}s"
    return f"{sec}s"


def _num(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None  # NaN/inf cannot be written to the API as JSON
    return float(value)


def to_progress(data: dict[str, Any], now: str) -> Progress:
    """Map the trainer's JSON to status.progress (percent and a readable ETA added)."""
    values: dict[str, Any] = {}
    for name, info in TrainingMetrics.model_fields.items():
        value = _num(data, info.alias or name)
        values[name] = int(value) if value is not None and info.annotation == int | None else value
    step, total, eta = values["step"], values["total_steps"], values["eta_seconds"]
    phase = data.get("phase")
    warning = data.get("dataWarning")
    checkpoint_warning = data.get("checkpointWarning")
    return Progress(
        tracking=_tracking(data.get("tracking")),
        network=_network(data.get("network")),
        **values,
        percent=round(100.0 * step / total, 1) if step is not None and total else None,
        eta=format_eta(eta),
        trainer_phase=phase if isinstance(phase, str) else None,
        data_warning=warning[:512] if isinstance(warning, str) else None,
        checkpoint_warning=checkpoint_warning[:512] if isinstance(checkpoint_warning, str) else None,
        updated_at=now,
    )


def _tracking(value: Any) -> TrackingStatus | None:
    """Where rank 0 reports the run (spec.tracking), when it says so in a shape that can be shown."""
    if not isinstance(value, dict):
        return None
    try:
        return TrackingStatus.model_validate(value)
    except ValidationError:
        return None


STATUS_PAIRS = 16
"""status.network keeps the slowest pairs (by bandwidth); metrics.json has them all."""


def _network(value: Any) -> NetworkReport | None:
    """Rank 0's network check, its pairs cut to the STATUS_PAIRS slowest; None when it is not one."""
    if not isinstance(value, dict):
        return None
    try:
        report = NetworkReport.model_validate(value)
    except ValidationError:
        return None
    slowest = sorted(report.pairs, key=lambda p: (p.bandwidth_gbps, -p.latency_ms))[:STATUS_PAIRS]
    return report.model_copy(update={"pairs": sorted(slowest, key=lambda p: p.target)})
