"""The progress client against a tiny local HTTP server standing in for rank 0."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from kubetune.status.progress import fetch_progress, format_eta, to_progress

PAYLOAD = {
    "step": 30,
    "totalSteps": 120,
    "epoch": 0.25,
    "loss": 2.5,
    "evalLoss": 2.7,
    "learningRate": 1e-4,
    "tokensPerSecond": 1234.5,
    "etaSeconds": 3725,
    "phase": "training",
}


@pytest.fixture
def rank0():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps(PAYLOAD).encode() if self.path == "/progress" else b"{}"
            self.send_response(200 if self.path == "/progress" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_fetches_progress_json(rank0):
    assert fetch_progress("127.0.0.1", rank0) == PAYLOAD


def test_unreachable_rank0_gives_none():
    assert fetch_progress("127.0.0.1", 1, timeout=0.5) is None


def test_maps_to_status_progress_with_percent_and_eta(rank0):
    p = to_progress(fetch_progress("127.0.0.1", rank0) or {}, "2025-01-01T00:00:00Z")
    assert (p.step, p.total_steps, p.percent) == (30, 120, 25.0)
    assert p.eval_loss == 2.7 and p.tokens_per_second == 1234.5
    assert p.eta == "1h02m" and p.trainer_phase == "training"
    assert p.updated_at == "2025-01-01T00:00:00Z"


def test_non_finite_loss_is_dropped():
    assert to_progress({"loss": float("nan")}, "t").loss is None


def test_eta_formats():
    assert (format_eta(59), format_eta(61), format_eta(None)) == ("59s", "1m01s", None)
