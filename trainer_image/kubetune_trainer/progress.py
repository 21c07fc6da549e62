"""Rank 0's progress endpoint: GET /progress (the contract's ProgressReport as camelCase JSON),
GET /metrics (the same values as Prometheus gauges, exposed by prometheus-client), and
POST /checkpoint (the contract's CHECKPOINT_PATH: the operator asks for a checkpoint at the next step)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kubetune.api.contract import CHECKPOINT_PATH, ProgressReport, TrainerPhase
from kubetune.api.models import TrainingMetrics
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

METRIC_PREFIX = "kubetune_trainer_"


class ProgressState:
    """The latest ProgressReport, updated by the training thread and read by the server's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._report = ProgressReport()
        self._asked = 0  # checkpoint requests received (POST /checkpoint); the report counts those served

    def ask_checkpoint(self) -> dict[str, int]:
        """A checkpoint request: counted once until served (asking again before then asks for nothing more)."""
        with self._lock:
            served = self._report.checkpoint_requests or 0
            if self._asked <= served:  # none pending: this one is new
                self._asked = served + 1
            return {"requested": self._asked, "step": self._report.step or 0}

    def checkpoint_asked(self) -> int:
        """The newest request received (0: none); more than `report().checkpoint_requests` means one is pending."""
        with self._lock:
            return self._asked

    def checkpoint_served(self, upto: int) -> None:
        """Requests up to `upto` are served by the checkpoint just written."""
        with self._lock:
            if upto > (self._report.checkpoint_requests or 0):
                self._report = self._report.model_copy(update={"checkpoint_requests": upto})

    def update(self, **values: Any) -> None:
        """Set fields by their Python names (step=..., total_steps=..., phase=TrainerPhase.TRAINING)."""
        unknown = set(values) - set(ProgressReport.model_fields)
        if unknown:
            raise KeyError(f"unknown progress fields: {sorted(unknown)}")
        with self._lock:
            self._report = self._report.model_copy(update=values)

    def report(self) -> ProgressReport:
        with self._lock:
            return self._report


class ProgressCollector(Collector):
    """One gauge per TrainingMetrics field that has a value, and kubetune_trainer_phase{phase}."""

    def __init__(self, state: ProgressState):
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        report = self.state.report()
        for name, info in TrainingMetrics.model_fields.items():
            value = getattr(report, name)
            if value is not None:
                yield GaugeMetricFamily(METRIC_PREFIX + name, info.description or name, value=float(value))
        phases = GaugeMetricFamily(
            METRIC_PREFIX + "phase", "Current trainer phase (1 for the active one)", labels=["phase"]
        )
        for phase in TrainerPhase:
            phases.add_metric([phase.value], 1.0 if phase == report.phase else 0.0)
        yield phases


def prometheus_text(state: ProgressState) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProgressCollector(state))
    return generate_latest(registry)


def serve(state: ProgressState, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Start serving in a daemon thread; port 0 picks a free one (server.server_address[1])."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/progress":
                body, ctype = state.report().model_dump_json(by_alias=True).encode(), "application/json"
            elif path == "/metrics":
                body, ctype = prometheus_text(state), CONTENT_TYPE_LATEST
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

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.split("?", 1)[0] != CHECKPOINT_PATH:
                self.send_error(404)
                return
            body = json.dumps(state.ask_checkpoint()).encode()
            self.send_response(202)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the operator polls often
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="kubetune-progress", daemon=True).start()
    return server
