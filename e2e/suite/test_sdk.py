"""Issue 14: the SDK and the CLI against the real API server, the operator's metrics scraped by a
real Prometheus.

One 2-rank CPU job, driven from Python: `Client.submit` -> `wait` (progress callbacks) and
`stream_progress` (both on a watch), suspended mid-run with `Client.suspend` (the gang's pods go,
phase Suspended) and resumed with `kubetune resume` (from the checkpoint written on SIGTERM, to
Succeeded) -> `artifacts().download()` from MinIO with the job's own Secret, checked against its
manifest. Meanwhile `kubetune get -w` runs in a real terminal (tmux),
whose screen is read while the job runs and after it succeeds, and Prometheus scrapes the
operator's /metrics: a PromQL query returns the job's loss. Plus the typed errors a user meets
first: Forbidden naming the RBAC verb, NotFound.

Both nodes. On the node agent the operator is a host process: restarted with its metrics on a free
host port, scraped there. On the real node it is the chart's Deployment pod on the pod network:
Prometheus runs inside the node's network namespace, as in a cluster, and finds the pod through
the ready endpoint of the chart's `<fullname>-metrics` Service, port `metrics` (what the chart's
ServiceMonitor has a prometheus-operator scrape), at the pod's IP; its HTTP API is published to the
host's loopback. The SDK and CLI run on the host in both modes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import NODE_MODE, RELEASE, RELEASE_NS, VENV_BIN, checkpoints, job_doc, wait_for
from harness.procs import free_port
from kubetune.client import Client, Forbidden, NotFound

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NS_KEY = "happy"
STEPS = 120  # long enough that a progress reading lands in the suspend window on an idle machine (40 steps ran in 15 s with 5 readings, none in it)
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
TMUX = shutil.which("tmux")


class Prometheus:
    """A real Prometheus (Debian's package, or any on PATH) scraping one target every second. With `node`
    (the real one) it runs inside the node's network namespace, where pod IPs route, and its HTTP API is
    published on the same port of the host's loopback."""

    def __init__(self, target: str, workdir: Path, node: Any = None):
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": "kubetune-operator", "honor_labels": True,
                                      "static_configs": [{"targets": [target]}]}]}  # fmt: skip
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (workdir / "prometheus.log").open("w")
        argv = [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}"]  # fmt: skip
        if node is not None:
            argv = node.ns.argv(argv)  # nsenter execs prometheus: terminate() reaches it
            node.publish(self.port)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for("prometheus ready", self.ready, 60)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}: {self.log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.log.close()


class Terminal:
    """A command in a real terminal: a tmux session on a private server, 170x20 characters."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.socket = f"kubetune-e2e-{uuid.uuid4().hex[:8]}"
        exports = " ".join(f"{k}={_quote(v)}" for k, v in env.items())
        line = f"env {exports} " + " ".join(_quote(c) for c in command)
        self.tmux("new-session", "-d", "-x", "170", "-y", "20", "-s", "t", line)
        self.tmux("set-option", "-t", "t", "remain-on-exit", "on")

    def tmux(self, *args: str) -> str:
        assert TMUX is not None
        return subprocess.run(
            [TMUX, "-L", self.socket, *args], check=True, capture_output=True, text=True
        ).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "t")

    def close(self) -> None:
        subprocess.run([TMUX or "tmux", "-L", self.socket, "kill-server"], capture_output=True)


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def operator_target(kctl: Any, operator: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """`host:port` of the operator's /metrics, as Prometheus reaches it."""
    if NODE_MODE == "kubelet":
        # The chart's Deployment pod, already serving on the port the chart sets, found as Prometheus' Kubernetes
        # discovery finds it: the ready endpoint of the chart's metrics Service, port `metrics` (Debian's Prometheus
        # is built without kubernetes_sd_configs, so the test reads the EndpointSlice itself).
        def endpoint() -> str | None:
            for es in (
                kctl.get(
                    RELEASE_NS, "endpointslices", None, f"-l=kubernetes.io/service-name={RELEASE}-metrics"
                )
                or []
            ):
                port = next((p["port"] for p in es.get("ports") or [] if p.get("name") == "metrics"), None)
                for ep in es.get("endpoints") or []:
                    if port and (ep.get("conditions") or {}).get("ready"):
                        return f"{ep['addresses'][0]}:{port}"
            return None

        return str(wait_for("a ready endpoint of the operator's metrics Service", endpoint, 60, 1))
    # The suite's operator process again, now with its metrics port on a free port of this machine.
    monkeypatch.setenv("KUBETUNE_METRICS_PORT", str(free_port()))
    operator.restart()
    return f"127.0.0.1:{os.environ['KUBETUNE_METRICS_PORT']}"


def test_sdk_cli_and_prometheus(cluster, kctl, suite_ns, s3, s3_data, node, operator, tmp_path, monkeypatch):
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip("no prometheus binary (apt-get install prometheus; .ci/run installs it)")
    if TMUX is None:
        pytest.skip("no tmux (apt-get install tmux; .ci/run installs it)")
    prometheus = Prometheus(operator_target(kctl, operator, monkeypatch), tmp_path / "prometheus",
                            node if NODE_MODE == "kubelet" else None)  # fmt: skip
    name = "sdk-lora"
    client = Client(namespace=suite_ns, kubeconfig=str(cluster.kubeconfig))
    env = {"KUBECONFIG": str(cluster.kubeconfig), "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "TERM": "xterm-256color",
           "COLUMNS": "170"}  # fmt: skip
    terminal = Terminal([str(VENV_BIN / "kubetune"), "get", "-w", "-n", suite_ns], env)
    try:
        # Typed errors first: a ServiceAccount with no Role, and a name that does not exist.
        nobody = Client(
            namespace=suite_ns, kubeconfig=str(cluster.kubeconfig_for_serviceaccount(suite_ns, "default"))
        )
        with pytest.raises(Forbidden) as refused:
            nobody.submit(job_doc(name, s3, s3_data, steps=STEPS))
        assert (refused.value.verb, refused.value.resource) == ("create", "finetunejobs.kubetune.io"), str(
            refused.value
        )
        with pytest.raises(NotFound):
            client.get("no-such-job")

        t0 = time.monotonic()
        job = client.submit(job_doc(name, s3, s3_data, steps=STEPS, checkpoint_steps=STEPS))
        assert job.metadata.namespace == suite_ns and job.metadata.uid
        streamed: list[Any] = []
        streamer = threading.Thread(
            target=lambda: streamed.extend(client.stream_progress(name, timeout=300)), daemon=True
        )
        streamer.start()
        seen: list[Any] = []
        screens: list[str] = []
        kt = str(VENV_BIN / "kubetune")
        cli_env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
        suspended: dict[
            str, Any
        ] = {}  # at: the step when suspend was asked; checkpoint; readings: len(seen) at resume

        def on_progress(p: Any) -> None:
            seen.append(p)
            if p.step and p.step < STEPS:
                screens.append(terminal.screen())  # the live table while it trains
            if p.step and 3 <= p.step < STEPS - 10 and not suspended:  # suspend from Python, mid-run
                suspended["at"] = p.step
                assert client.suspend(name).spec.run_policy.suspend is True

        def on_phase(phase: str) -> None:
            if phase != "Suspended" or "readings" in suspended:
                return
            gang = f"-l=kubetune.io/job-name={name}"
            wait_for("the gang's pods gone", lambda: not kctl.get(suite_ns, "pods", None, gang), 90, 1)
            suspended["checkpoint"] = max(checkpoints(s3, name), default=0)
            suspended["readings"] = len(seen)
            out = subprocess.run(
                [kt, "resume", name, "-n", suite_ns], env=cli_env, capture_output=True, text=True
            )
            assert out.returncode == 0 and out.stdout.strip() == f"finetunejob.kubetune.io/{name} resumed", (
                out.stderr
            )

        done = client.wait(name, timeout=420, on_progress=on_progress, on_phase=on_phase)
        streamer.join(30)
        took = time.monotonic() - t0
        print(f"\n[suite] {name}: submit -> Succeeded via the SDK in {took:.1f}s (suspended at step {suspended.get('at')}, "
              f"checkpoint {suspended.get('checkpoint')}); {len(seen)} progress callbacks, {len(streamed)} streamed",
              file=sys.stderr)  # fmt: skip
        assert done.status is not None and done.status.phase == "Succeeded"
        assert done.status.progress is not None and done.status.progress.step == STEPS
        # Suspended, then resumed from the checkpoint written on SIGTERM: no step below it afterwards.
        assert "readings" in suspended, f"never Suspended (asked at step {suspended.get('at')})"
        assert suspended["checkpoint"] >= suspended["at"], suspended
        before = [p.step for p in seen[: suspended["readings"]] if p.step is not None]
        # (the status keeps the last reading while Suspended; a phase change re-sends it with the same step)
        after = [p.step for p in seen[suspended["readings"] :] if p.step is not None and p.step != before[-1]]
        assert after and min(after) >= suspended["checkpoint"] and after[-1] == STEPS, (
            suspended,
            before,
            after,
        )
        for readings in (seen, streamed):
            steps = [p.step for p in readings if p.step is not None]
            assert len(set(steps)) >= 2 and steps == sorted(steps) and steps[-1] == STEPS, steps
        assert [j.metadata.name for j in client.list(phase="Succeeded")] == [name]
        assert client.list(phase="Running") == []

        # Artifacts: the URIs, and the merged model downloaded with the job's Secret, checked against its manifest.
        # On the real node the job's spec.storage.endpoint (10.0.0.20) is MinIO as pods reach it: from this machine the
        # SDK and the CLI read through MinIO's host address (`endpoint`, as a user does through a port-forward).
        here = s3.endpoint if s3_data["endpoint"] != s3.endpoint else None
        arts = client.artifacts(name, endpoint=here)
        assert arts.storage.endpoint == s3.endpoint
        assert arts.uris.merged_model == f"s3://{s3.bucket}/runs/{name}/model/"
        assert arts.credentials is not None  # read from spec.storage.secretRef
        got = arts.download(tmp_path / "download")
        manifest = json.loads(
            s3.client().get_object(Bucket=s3.bucket, Key=f"runs/{name}/manifest.json")["Body"].read()
        )
        in_model = {k for k in manifest["files"] if k.startswith("model/")}
        assert got.verified == len(in_model) >= 3
        assert {str(p.relative_to(tmp_path / "download")) for p in got.files} == in_model
        assert json.loads((got.path / "config.json").read_text())["model_type"] == "llama"

        # PromQL: the operator re-exports the job's loss; Prometheus has scraped it.
        loss = done.status.progress.loss

        def sample(promql: str) -> float | None:
            result = prometheus.query(promql)
            return float(result[0]["value"][1]) if result else None

        # Scraped every second: wait for the scrape after the final status (the values are then exact).
        wait_for(
            "the final loss in Prometheus",
            lambda: (
                sample(f'kubetune_job_loss{{namespace="{suite_ns}", finetunejob="{name}"}}')
                == pytest.approx(loss, rel=1e-6)
            ),
            30,
        )
        wait_for(
            "one Succeeded job in Prometheus",
            lambda: sample(f'kubetune_finetunejobs{{namespace="{suite_ns}", phase="Succeeded"}}') == 1,
            30,
        )
        assert sample(f'kubetune_finetunejobs{{namespace="{suite_ns}", phase="Running"}}') == 0
        latency = prometheus.query("kubetune_time_to_workload_seconds_count")
        assert latency and float(latency[0]["value"][1]) >= 1
        created = prometheus.query('sum(kubetune_api_requests_total{verb="create", resource="jobs"})')
        assert created and float(created[0]["value"][1]) >= 1
        patched = prometheus.query('sum(kubetune_api_requests_total{verb="patch", resource="jobs"})')
        assert patched and float(patched[0]["value"][1]) >= 2  # the Job suspended, then resumed (same Job)
        # Kopf's own watch streams are counted too (the operator's client never watches).
        watches = prometheus.query(
            'sum by (resource) (kubetune_api_requests_total{verb="watch", code="200"})'
        )
        assert {w["metric"]["resource"] for w in watches} >= {"finetunejobs", "jobs", "pods"}, watches

        # The terminal: the live table showed the job training, then its end.
        final = wait_for(
            "Succeeded on the tmux screen",
            lambda: (lambda s: s if "Succeeded" in s else None)(terminal.screen()),
            15,
        )
        training = [sc for sc in screens if name in sc and "Running" in sc]
        print("[suite] kubetune get -w, while training:\n" + (training[-1] if training else "(none)") +
              "\n[suite] and at the end:\n" + final, file=sys.stderr)  # fmt: skip
        assert training, screens
        header = next(line for line in final.splitlines() if "PHASE" in line)
        assert all(col in header for col in ("NAME", "PROGRESS", "LOSS", "TOKENS/S", "ETA"))
        row = next(line for line in final.splitlines() if name in line)
        assert "Succeeded" in row and "100.0%" in row and f"{loss:.4f}" in row and f"{STEPS}/{STEPS}" in row

        # The other commands, as a user types them.
        out = subprocess.run(
            [kt, "get", name, "-n", suite_ns, "-o", "json"],
            env=cli_env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(out.stdout)["status"]["phase"] == "Succeeded"
        out = subprocess.run(
            [kt, "describe", name, "-n", suite_ns], env=cli_env, capture_output=True, text=True, check=True
        )
        assert "Phase:        Succeeded" in out.stdout and arts.uris.merged_model in out.stdout
        out = subprocess.run([kt, "download", name, str(tmp_path / "cli"), "-n", suite_ns, "--what", "adapter",
                              *(["--s3-endpoint", here] if here else [])], env=cli_env, capture_output=True, text=True)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "cli" / "adapter" / "adapter_config.json").exists()

        if NODE_MODE == "kubelet":  # the node agent has no kubelet API to read logs from
            lines = list(client.logs(name, rank=0, follow=False))
            assert any("[kubetune]" in line for line in lines), lines[-20:]

        client.delete(name)
        wait_for("the FineTuneJob gone", lambda: not client.list(), 60)
        out = subprocess.run(
            [kt, "describe", name, "-n", suite_ns], env=cli_env, capture_output=True, text=True
        )
        assert out.returncode == 1 and f"finetunejob {name!r} not found in namespace {suite_ns}" in out.stderr
    finally:
        terminal.close()
        prometheus.stop()
