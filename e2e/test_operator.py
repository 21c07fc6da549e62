"""The real operator (`kubetune operator` as a subprocess) against a real kube-apiserver.

Covers: the CRD is accepted (structural schema, CEL cost budget), the API server's CEL
refuses a bad spec, the operator refuses what the schema cannot check (Failed, SpecValid
False, no pods), a valid job gets its owned ConfigMap/Service/Indexed Job, suspend and
resume, a killed pod restarts the whole gang, and deletion cascades.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "crds" / "kubetune.io_finetunejobs.yaml"
DATA = ROOT / "examples" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def crd(cluster: Any) -> None:
    r = cluster.kubectl("apply", "--server-side", "-f", str(CRD), check=False)
    assert r.returncode == 0, r.stderr
    cluster.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=60s")


@pytest.fixture
def operator(cluster: Any, crd: None, namespace: str, tmp_path: Path) -> Iterator[Path]:
    log = tmp_path / "operator.log"
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    cmd = [
        sys.executable,
        "-m",
        "kubetune.cli.main",
        "operator",
        "-n",
        namespace,
        "--poll-interval",
        "1",
        "--liveness",
        f"http://127.0.0.1:{free_port()}/healthz",
        "--log-format",
        "json",
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        if proc.returncode not in (0, -15, None):
            print(log.read_text()[-5000:], file=sys.stderr)


def get(cluster: Any, ns: str, kind: str, name: str) -> dict[str, Any] | None:
    r = cluster.kubectl("-n", ns, "get", kind, name, "-o", "json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def ftj(name: str, **spec: Any) -> str:
    base: dict[str, Any] = {
        "model": {"source": f"file://{DATA / 'tiny-llama'}"},
        "dataset": {
            "train": f"file://{DATA / 'spell-digits' / 'train.jsonl'}",
            "format": "chat",
            "maxSeqLength": 32,
        },
        "method": "lora",
        "training": {"maxSteps": 100000, "perDeviceBatchSize": 4, "loggingSteps": 1},
        "distributed": {"nodes": 2, "procsPerNode": 1, "backend": "ddp"},
        "output": {"uri": f"file:///tmp/kubetune-e2e-out/{name}", "checkpointSteps": 50},
    }
    base.update(spec)
    return json.dumps(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": base,
        }
    )


def phase(cluster: Any, ns: str, name: str) -> str | None:
    obj = get(cluster, ns, "ftj", name) or {}
    return (obj.get("status") or {}).get("phase")


def test_crd_is_established_with_printer_columns(cluster, crd):
    out = cluster.kubectl("get", "crd", "finetunejobs.kubetune.io", "-o", "json").stdout
    version = json.loads(out)["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]][:3] == ["Phase", "Progress %", "Loss"]


def test_api_server_cel_refuses_lora_block_with_full_method(cluster, crd, namespace):
    r = cluster.kubectl(
        "-n", namespace, "apply", "-f", "-", input=ftj("bad-cel", method="full", lora={"r": 8}), check=False
    )
    assert r.returncode != 0
    assert (
        "spec.lora: is only allowed with method: lora" in r.stderr
    )  # the message kubetune validate gives too


def test_api_server_cel_wants_exactly_one_of_train_and_sources(cluster, crd, namespace):
    train = f"file://{DATA / 'spell-digits' / 'train.jsonl'}"
    both = ftj("bad-sources", dataset={"train": train, "sources": [{"path": train, "weight": 2}]})
    r = cluster.kubectl("-n", namespace, "apply", "--dry-run=server", "-f", "-", input=both, check=False)
    assert r.returncode != 0 and "set exactly one of spec.dataset.train" in r.stderr
    mixed = ftj(
        "mixed-sources",
        dataset={"sources": [{"path": train, "weight": 2, "fields": {"roles": {"bot": "assistant"}}}]},
    )
    r = cluster.kubectl("-n", namespace, "apply", "--dry-run=server", "-f", "-", input=mixed, check=False)
    assert r.returncode == 0, r.stderr


def test_api_server_refuses_out_of_bounds(cluster, crd, namespace):
    doc = ftj("bad-bound", training={"perDeviceBatchSize": 0})
    r = cluster.kubectl("-n", namespace, "apply", "-f", "-", input=doc, check=False)
    assert r.returncode != 0 and "perDeviceBatchSize" in r.stderr


def test_operator_refuses_spec_with_condition_and_no_pods(cluster, operator, namespace):
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=ftj("refused", training={"evalSteps": 5}))
    wait_for("phase Failed", lambda: phase(cluster, namespace, "refused") == "Failed")
    status = get(cluster, namespace, "ftj", "refused")["status"]
    valid = next(c for c in status["conditions"] if c["type"] == "SpecValid")
    assert valid["status"] == "False" and "spec.training.evalSteps" in valid["message"]
    assert get(cluster, namespace, "job", "refused-r0") is None
    events = cluster.kubectl("-n", namespace, "get", "events", "-o", "json").stdout
    assert "SpecInvalid" in events


def test_jobs_on_one_output_waiting_when_the_operator_starts_get_one_job_between_them(
    cluster, crd, namespace, request
):
    """The first passes after a start must see every FineTuneJob, not only those listed so far. Jobs created on
    one output while no operator ran: the first (creationTimestamp) is named to come last in the listing (the
    API server lists by name). It alone gets a Job; the others wait with OutputInUse naming it. Before the Kopf
    index that fills the store ahead of any handler, the operator reconciled the jobs listed first before it had
    seen the first one, and gave one of them a Job too (as it did in e2e/test_chart_lifecycle.py)."""
    output = {"uri": "s3://out/shared-output"}
    first = "zz-first"

    def apply(*names: str) -> None:
        items = [json.loads(ftj(n, output=output, runPolicy={"suspend": True})) for n in names]  # no pods run
        cluster.kubectl(
            "-n",
            namespace,
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        )

    apply(first)
    time.sleep(1.1)  # creationTimestamp has whole seconds: the others are strictly later
    later = [f"later-{i:02d}" for i in range(8)]
    apply(*later)
    # The operator starts only now: every job exists before its first listing.
    log = request.getfixturevalue("operator")
    names = [first, *later]

    def recorded() -> list[dict[str, Any]] | None:
        objs = [get(cluster, namespace, "ftj", n) or {} for n in names]
        return objs if all((o.get("status") or {}).get("phase") == "Suspended" for o in objs) else None

    objs = wait_for("every job recorded Suspended", recorded, 60)
    given_a_job = [n for n in names if get(cluster, namespace, "job", f"{n}-r0") is not None]
    assert given_a_job == [first], (given_a_job, log.read_text()[-3000:])
    for obj in objs[1:]:
        running = {c["type"]: c for c in obj["status"]["conditions"]}["Running"]
        assert running["reason"] == "OutputInUse" and f"{namespace}/{first}" in running["message"], running


# Node agent only (it skips on the real node): its job reads the model and data from this checkout (file://), which
# containers cannot see, and its operator runs on the host, outside the pod network (rank 0's /progress unreachable).
# On the real node the same lifecycle (suspend/resume, a deleted pod -> a gang restart, deletion cascading to the owned
# children) is checked through the chart's operator pod and S3 by e2e/suite/test_faults.py.
def test_valid_job_gets_owned_children_suspends_restarts_and_cascades(
    cluster, operator, node_agent, namespace
):
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=ftj("demo"))
    job = wait_for("workload Job", lambda: get(cluster, namespace, "job", "demo-r0"))
    owner = get(cluster, namespace, "ftj", "demo")
    for kind, name in (("configmap", "demo-config"), ("service", "demo"), ("job", "demo-r0")):
        obj = wait_for(f"{kind} {name}", lambda k=kind, n=name: get(cluster, namespace, k, n))
        assert obj["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == 2
    wait_for(
        "Running or Initializing",
        lambda: phase(cluster, namespace, "demo") in ("Initializing", "Running"),
        120,
    )

    # Suspend: the Job is suspended, the phase follows; resume: back to work.
    cluster.kubectl(
        "-n",
        namespace,
        "patch",
        "ftj",
        "demo",
        "--type=merge",
        "-p",
        '{"spec":{"runPolicy":{"suspend":true}}}',
    )
    wait_for(
        "Job suspended",
        lambda: (get(cluster, namespace, "job", "demo-r0") or {})["spec"].get("suspend") is True,
    )
    wait_for("phase Suspended", lambda: phase(cluster, namespace, "demo") == "Suspended", 60)
    cluster.kubectl(
        "-n",
        namespace,
        "patch",
        "ftj",
        "demo",
        "--type=merge",
        "-p",
        '{"spec":{"runPolicy":{"suspend":false}}}',
    )
    wait_for(
        "Job resumed",
        lambda: (get(cluster, namespace, "job", "demo-r0") or {})["spec"].get("suspend") is False,
    )

    # Kill a rank: the whole gang is replaced by the next generation, in the same Job.
    def released_running() -> list[
        dict[str, Any]
    ]:  # the resumed gang's pods, once the operator released them
        out = cluster.kubectl(
            "-n", namespace, "get", "pods", "-l", "kubetune.io/restart=0", "-o", "json"
        ).stdout
        return [p for p in json.loads(out)["items"] if p["status"].get("phase") == "Running"]

    wait_for("a running pod of the released gang", released_running, 120)
    pods = {"items": released_running()}
    victim = pods["items"][0]["metadata"]["name"]
    cluster.kubectl("-n", namespace, "delete", "pod", victim, "--wait=false")
    wait_for(
        "restart 1",
        lambda: ((get(cluster, namespace, "ftj", "demo") or {}).get("status") or {}).get("restarts") == 1,
        120,
    )

    def generation_1() -> bool:
        out = cluster.kubectl(
            "-n", namespace, "get", "pods", "-l", "kubetune.io/restart=1", "-o", "json"
        ).stdout
        return len(json.loads(out)["items"]) == 2

    wait_for("gang generation 1, in the same Job", generation_1, 120)
    assert get(cluster, namespace, "job", "demo-r1") is None

    # Delete: owner references cascade.
    cluster.kubectl("-n", namespace, "delete", "ftj", "demo", "--wait=true", "--timeout=60s")
    wait_for(
        "children gone",
        lambda: (
            not any(
                get(cluster, namespace, k, n)
                for k, n in (("configmap", "demo-config"), ("service", "demo"), ("job", "demo-r0"))
            )
        ),
        90,
    )
