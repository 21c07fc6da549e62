"""The real node (the default, KUBETUNE_E2E_NODE=kubelet): containerd + kubelet + kube-scheduler +
CoreDNS, the operator and trainer images built from this repository, the chart installed with helm.

    .venv/bin/pytest e2e/test_kubelet.py

Skipped in the fast node-agent mode (KUBETUNE_E2E_NODE=agent).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import binaries
from harness.cluster import RESTRICTED, Cluster
from harness.images import chart_images
from harness.mode import NODE_MODE
from harness.s3 import S3Server
from harness.waiting import wait_for
from kubetune.client import Client

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(
        NODE_MODE != "kubelet",
        reason="KUBETUNE_E2E_NODE=agent: the real node is not started in the fast mode",
    ),
]
ROOT = Path(__file__).resolve().parents[1]
KUBETUNE = Path(sys.executable).parent / "kubetune"
OPERATOR_IMAGE, TRAINER_IMAGE = chart_images()
WATCHED = "ktk-jobs"  # the namespace the helm-installed operator watches
# release and namespace distinct from e2e/suite's install (kubetune in kubetune-system), which runs
# in the same session in this mode: fullname ktk-kubetune, its own ClusterRole and ServiceAccount
RELEASE, RELEASE_NS = "ktk", "ktk-system"
FULLNAME = f"{RELEASE}-kubetune"


def pod_phase(cluster: Cluster, ns: str, name: str) -> str:
    return str(
        (cluster.admin.get_or_none(f"/api/v1/namespaces/{ns}/pods/{name}") or {})
        .get("status", {})
        .get("phase")
    )


def test_node_is_ready_with_gpus_and_images(cluster: Cluster, kubelet_node: Any) -> None:
    node = cluster.admin.get(f"/api/v1/nodes/{kubelet_node.name}")
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    addrs = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addrs["InternalIP"] == "10.1.0.1"
    names = {n for i in node["status"].get("images", []) for n in i.get("names") or []}
    assert {OPERATOR_IMAGE, TRAINER_IMAGE} <= names, names


def test_trainer_image_pod_runs_as_uid_1000_and_logs(
    cluster: Cluster, kubelet_node: Any, namespace: str
) -> None:
    """The trainer image under the operator's securityContext; `kubectl logs`; exit code + termination message."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe", "namespace": namespace},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "runAsGroup": 1000,
                "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
            "containers": [
                {
                    "name": "trainer",
                    "image": TRAINER_IMAGE,
                    "command": ["python", "-c"],
                    "args": [
                        "import os, sys, torch, kubetune_trainer, shutil\n"
                        "print('uid', os.getuid(), 'torch', torch.__version__, flush=True)\n"
                        "shutil.disk_usage('/dev/shm')\n"
                        "open('/dev/termination-log', 'w').write('bye')\n"
                        "sys.exit(3)"
                    ],
                    "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 1000,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }
    cluster.apply(json.dumps(pod))
    wait_for(
        "probe finished", lambda: pod_phase(cluster, namespace, "probe") in ("Succeeded", "Failed"), 120, 1
    )
    got = cluster.admin.get(f"/api/v1/namespaces/{namespace}/pods/probe")
    term = got["status"]["containerStatuses"][0]["state"]["terminated"]
    assert got["status"]["phase"] == "Failed" and term["exitCode"] == 3 and term["message"] == "bye", term
    logs = cluster.kubectl("-n", namespace, "logs", "probe").stdout
    assert logs.startswith("uid 1000 torch "), logs


@pytest.fixture(scope="module")
def helm_release(cluster: Cluster, kubelet_node: Any) -> dict[str, Any]:
    """`helm install` of charts/kubetune with default images: the operator runs as its Deployment's pod."""
    helm = binaries.ensure("helm")["helm"]
    for ns in (
        RELEASE_NS,
        WATCHED,
    ):  # the operator, the helm-test Pod and the trainers under Pod Security "restricted"
        cluster.create_namespace(ns, RESTRICTED)
    t0 = time.monotonic()
    cmd = [
        str(helm),
        "--kubeconfig",
        str(cluster.kubeconfig),
        "install",
        RELEASE,
        str(ROOT / "charts" / "kubetune"),
        "--namespace",
        RELEASE_NS,
        "--create-namespace",
        "--set",
        f"watchNamespaces={{{WATCHED}}}",
        "--set",
        "pollInterval=2",
        "--wait",
        "--timeout",
        "180s",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(cluster.kubectl("-n", RELEASE_NS, "describe", "pods", check=False).stdout, file=sys.stderr)
        for flag in ("--previous", "--timestamps"):
            print(
                cluster.kubectl("-n", RELEASE_NS, "logs", f"deploy/{FULLNAME}", flag, check=False).stdout[
                    -5000:
                ],
                file=sys.stderr,
            )
    assert r.returncode == 0, r.stdout + r.stderr
    print(f"\nhelm install --wait: {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return {"helm": helm}


def test_helm_install_runs_operator_pod_and_helm_test_passes(
    cluster: Cluster, helm_release: dict[str, Any]
) -> None:
    pods = cluster.admin.get(
        f"/api/v1/namespaces/{RELEASE_NS}/pods", query={"labelSelector": "app.kubernetes.io/name=kubetune"}
    )["items"]
    running = [p for p in pods if p["status"]["phase"] == "Running"]
    assert len(running) == 2, [p["status"]["phase"] for p in pods]  # the chart's default: two replicas
    for op in running:
        assert op["spec"]["serviceAccountName"] == FULLNAME
        assert op["spec"]["containers"][0]["image"] == OPERATOR_IMAGE
        assert all(
            c["ready"] for c in op["status"]["containerStatuses"]
        )  # readiness: Kopf's /healthz, or the standby's
    # Exactly one of them leads: the Lease (named after the release) names it (pod name + a random suffix).
    lease = f"/apis/coordination.k8s.io/v1/namespaces/{RELEASE_NS}/leases/{FULLNAME}"
    holder = cluster.admin.wait_for(lease, lambda o: bool(o["spec"].get("holderIdentity")))["spec"][
        "holderIdentity"
    ]
    assert [p["metadata"]["name"] for p in running if holder.startswith(p["metadata"]["name"] + "_")], holder
    r = subprocess.run(
        [
            str(helm_release["helm"]),
            "--kubeconfig",
            str(cluster.kubeconfig),
            "test",
            RELEASE,
            "--namespace",
            RELEASE_NS,
            "--timeout",
            "120s",
        ],
        capture_output=True,
        text=True,
    )
    # (no --logs: the hook's delete policy removes a passing test pod before helm could read it)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(rf"TEST SUITE:\s+{FULLNAME}-test\n.*\n.*\n\s*Phase:\s+Succeeded", r.stdout), r.stdout


def test_lora_job_on_two_pods_through_the_installed_operator_and_its_logs(
    cluster: Cluster, kubelet_node: Any, helm_release: dict[str, Any], s3: S3Server
) -> None:
    """torchrun's rendezvous resolves `<job>-0.<service>` through CoreDNS, the operator pod reads
    rank 0's /progress over the pod network, and `kubectl logs` of a rank shows progress lines.
    The SDK's `logs()` and `kubetune logs NAME --rank N [-f]` read the same kubelet log stream:
    followers started while the job runs end by themselves when their pod ends."""
    ns, name = WATCHED, "kubelet-lora"
    data = ROOT / "examples" / "data"
    client = s3.client()
    for p in data.rglob("*"):
        if p.is_file() and p.suffix != ".py":
            client.upload_file(str(p), s3.bucket, f"data/{p.relative_to(data)}")
    endpoint = "http://" + kubelet_node.expose(int(s3.endpoint.rsplit(":", 1)[1]))
    cluster.apply(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "s3-creds", "namespace": ns},
                "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key},
            }
        )
    )
    doc = yaml.safe_load((ROOT / "examples" / "cpu-2node-lora.yaml").read_text())
    base = f"s3://{s3.bucket}/data"
    doc["metadata"] = {"name": name, "namespace": ns}
    spec = doc["spec"]
    spec["model"]["source"] = f"{base}/tiny-llama"
    spec["dataset"].update(train=f"{base}/spell-digits/train.jsonl", eval=f"{base}/spell-digits/eval.jsonl")
    spec["training"].update(
        maxSteps=30, perDeviceBatchSize=4, globalBatchSize=8, warmupSteps=2, loggingSteps=1, evalSteps=30
    )
    spec["output"].update(uri=f"s3://{s3.bucket}/runs/{name}", checkpointSteps=15)
    spec["storage"] = {"endpoint": endpoint, "secretRef": {"name": "s3-creds"}}
    spec["resources"] = {"requests": {"cpu": "100m", "memory": "256Mi"}}
    cluster.apply(json.dumps(doc))
    path = f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs/{name}"
    steps: list[int] = []
    sdk = Client(namespace=ns, kubeconfig=str(cluster.kubeconfig))
    cli_env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    followed: list[str] = []  # SDK logs(rank 0, follow=True), started while the job runs
    follow_error: list[BaseException] = []

    def follow_rank0() -> None:
        try:
            followed.extend(sdk.logs(name, rank=0, follow=True))
        except Exception as exc:  # reported by the assertions below
            follow_error.append(exc)

    follower = threading.Thread(target=follow_rank0, daemon=True)
    cli_follow: subprocess.Popen[str] | None = None  # `kubetune logs NAME --rank 1 -f`
    following_while_running: list[bool] = []

    def done() -> bool:
        nonlocal cli_follow
        st = (cluster.admin.get_or_none(path) or {}).get("status") or {}
        if st.get("phase") == "Running" and (st.get("progress") or {}).get("step"):
            steps.append(st["progress"]["step"])
        if cli_follow is not None and st.get("phase") == "Running":
            following_while_running.append(cli_follow.poll() is None)
        if st.get("phase") in ("Initializing", "Running") and cli_follow is None:
            follower.start()
            cli_follow = subprocess.Popen([str(KUBETUNE), "logs", name, "--rank", "1", "-f", "-n", ns], env=cli_env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        return st.get("phase") in ("Succeeded", "Failed")

    try:
        wait_for("job finished", done, 600, 1)
    finally:
        print(
            cluster.kubectl("-n", ns, "get", "pods,jobs", "-o", "wide", check=False).stdout, file=sys.stderr
        )
    status = cluster.admin.get(path)["status"]
    pods = cluster.admin.get(
        f"/api/v1/namespaces/{ns}/pods", query={"labelSelector": f"kubetune.io/job-name={name}"}
    )["items"]
    logs = {
        p["metadata"]["name"]: cluster.kubectl("-n", ns, "logs", p["metadata"]["name"], check=False).stdout
        for p in pods
    }
    assert status["phase"] == "Succeeded", (
        json.dumps(status, indent=1) + "\n" + "\n".join(f"--- {k}\n{v[-3000:]}" for k, v in logs.items())
    )
    assert len(pods) == 2 and {p["spec"]["nodeName"] for p in pods} == {kubelet_node.name}
    assert steps, "the operator never reported a step while Running (rank 0's /progress over the pod network)"
    assert status["progress"]["step"] == 30
    rank0 = next(v for k, v in logs.items() if "-0-" in k)
    assert "world size 2" in rank0, rank0[-2000:]
    assert re.search(r"step \d+/30 loss \d", rank0), rank0[-2000:]

    # The SDK and the CLI read the kubelet's log of the right rank; the followers ended with their pods.
    rank1 = next(v for k, v in logs.items() if "-1-" in k)
    follower.join(60)
    assert not follower.is_alive(), "logs(follow=True) did not end when rank 0's pod ended"
    assert not follow_error, follow_error
    assert cli_follow is not None
    out, err = cli_follow.communicate(timeout=60)  # raises TimeoutExpired if -f never ended
    assert cli_follow.returncode == 0, err
    assert any(following_while_running), "kubetune logs -f was never seen following a running job"
    assert re.search(r"step \d+/30 loss \d", "\n".join(followed)) and "world size 2" in "\n".join(followed), (
        followed[-20:]
    )
    assert any("step 30/30 loss" in line for line in followed), followed[-20:]
    assert "world size 2" not in rank1 and rank1.strip(), rank1[-2000:]  # rank 1 prints no progress lines
    assert out.strip() == rank1.strip(), (out[-1500:], rank1[-1500:])
    got = subprocess.run([str(KUBETUNE), "logs", name, "--rank", "1", "-n", ns], env=cli_env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert got.returncode == 0 and got.stdout.strip() == rank1.strip(), got.stderr
    got = subprocess.run([str(KUBETUNE), "logs", name, "--tail", "3", "-n", ns], env=cli_env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    # (the kubelet counts --tail in its CRI log entries, where tqdm's unterminated bars are entries of their own)
    pod0 = next(k for k in logs if "-0-" in k)
    assert got.stdout == cluster.kubectl("-n", ns, "logs", pod0, "--tail", "3").stdout and got.stdout, (
        got.stderr
    )
    sdk_text = "\n".join(
        sdk.logs(name, rank=0, follow=False)
    )  # raw; subprocess text mode turned kubectl's \r into \n
    assert sdk_text.replace("\r\n", "\n").replace("\r", "\n").strip() == rank0.strip()
