"""Rank 0's progress endpoint: GET /progress (JSON, camelCase) and GET /metrics (Prometheus text)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Keys the operator reads (kubetune.api.models.Progress uses the same camelCase names).
KEYS = ("step", "totalSteps", "epoch", "loss", "evalLoss", "learningRate", "tokensPerSecond", "etaSeconds", "phase", "dataWarning",
        "rewardAccuracy", "rewardMargin")
METRICS = {
    "step": ("kubetune_trainer_step", "Optimizer steps completed"),
    "totalSteps": ("kubetune_trainer_total_steps", "Optimizer steps planned"),
    "epoch": ("kubetune_trainer_epoch", "Epochs completed (fractional)"),
    "loss": ("kubetune_trainer_loss", "Training loss (mean over the last logging window)"),
    "evalLoss": ("kubetune_trainer_eval_loss", "Latest evaluation loss"),
    "learningRate": ("kubetune_trainer_learning_rate", "Current learning rate"),
    "tokensPerSecond": ("kubetune_trainer_tokens_per_second", "Training tokens per second, all ranks"),
    "etaSeconds": ("kubetune_trainer_eta_seconds", "Estimated seconds to the end of training"),
    "rewardAccuracy": ("kubetune_trainer_reward_accuracy", "DPO: share of pairs ranked right (last logging window)"),
    "rewardMargin": ("kubetune_trainer_reward_margin", "DPO: mean chosen minus rejected reward (last logging window)"),
}
PHASES = ("Initializing", "Training", "Evaluating", "Saving", "Succeeded", "Failed")


class ProgressState:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {key: None for key in KEYS}
        self._values["phase"] = "Initializing"

    def update(self, **values: Any) -> None:
        unknown = set(values) - set(KEYS)
        if unknown:
            raise KeyError(f"unknown progress keys: {sorted(unknown)}")
        with self._lock:
            self._values.update(values)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._values)


def prometheus_text(values: dict[str, Any]) -> str:
    lines = []
    for key, (name, help_text) in METRICS.items():
        if values.get(key) is None:
            continue
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {float(values[key])!r}"]
    phase = values.get("phase")
    lines += ["# HELP kubetune_trainer_phase Current trainer phase (1 for the active one)", "# TYPE kubetune_trainer_phase gauge"]
    lines += [f'kubetune_trainer_phase{{phase="{p}"}} {1 if p == phase else 0}' for p in PHASES]
    return "\n".join(lines) + "\n"


def serve(state: ProgressState, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Start serving in a daemon thread; port 0 picks a free one (server.server_address[1])."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/progress":
                body, ctype = json.dumps(state.snapshot()).encode(), "application/json"
            elif path == "/metrics":
                body, ctype = prometheus_text(state.snapshot()).encode(), "text/plain; version=0.0.4"
            elif path in ("/healthz", "/"):
                body, ctype = b"ok\n", "text/plain"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the operator polls often
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="kubetune-progress", daemon=True).start()
    return server
