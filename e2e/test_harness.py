"""Tests that prove the e2e harness is real: RBAC, controllers, the node agent, DNS, S3; and that kubetune's
children are collected with their FineTuneJob by the real garbage collector."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from harness.cluster import Cluster
from harness.kube import Obj
from harness.node_agent import NodeAgent
from harness.procs import free_port
from harness.s3 import S3Server

PY = "python3"
CRD = Path(__file__).resolve().parents[1] / "crds" / "kubetune.io_finetunejobs.yaml"


def pod_phase_in(*phases: str) -> Any:
    return lambda p: p.get("status", {}).get("phase") in phases


def wait_gone(cluster: Cluster, path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while cluster.admin.get_or_none(path) is not None:
        assert time.monotonic() < deadline, f"{path} still exists after {timeout}s"
        time.sleep(0.25)


def job_condition(job: Obj, type_: str) -> bool:
    return any(
        c["type"] == type_ and c["status"] == "True" for c in job.get("status", {}).get("conditions") or []
    )


def test_rbac_refuses_serviceaccount_without_rights(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    kc = cluster.kubeconfig_for_serviceaccount(namespace, "nobody")
    r = cluster.kubectl("auth", "can-i", "create", "pods", "-n", namespace, kubeconfig=kc, check=False)
    assert (r.returncode, r.stdout.strip()) == (1, "no")
    r = cluster.kubectl("get", "pods", "-n", namespace, kubeconfig=kc, check=False)
    assert r.returncode != 0 and "Forbidden" in r.stderr
    assert f"system:serviceaccount:{namespace}:nobody" in r.stderr
    # granting a Role makes the same request pass: authorization, not a broken token
    cluster.kubectl("create", "role", "reader", "--verb=list", "--resource=pods", "-n", namespace)
    cluster.kubectl(
        "create",
        "rolebinding",
        "reader",
        "--role=reader",
        f"--serviceaccount={namespace}:nobody",
        "-n",
        namespace,
    )
    deadline = time.monotonic() + 10
    while cluster.kubectl("get", "pods", "-n", namespace, kubeconfig=kc, check=False).returncode:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_kubernetes_python_client_and_serviceaccount_kubeconfig(cluster: Cluster, namespace: str) -> None:
    from kubernetes import client, config  # noqa: PLC0415

    names = [n.metadata.name for n in client.CoreV1Api(cluster.api_client()).list_namespace().items]
    assert namespace in names
    cluster.kubectl("create", "serviceaccount", "op", "-n", namespace)
    sa = config.new_client_from_config(str(cluster.kubeconfig_for_serviceaccount(namespace, "op")))
    with pytest.raises(client.ApiException) as e:
        client.CoreV1Api(sa).list_namespaced_secret(namespace)
    assert e.value.status == 403


def test_indexed_job_runs_to_completion(cluster: Cluster, node_agent: NodeAgent, namespace: str) -> None:
    cluster.apply(f"""
apiVersion: batch/v1
kind: Job
metadata: {{name: indexed, namespace: {namespace}}}
spec:
  completions: 2
  parallelism: 2
  completionMode: Indexed
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: main
        image: ignored
        command: [{PY}, -c, "import os; print('index', os.environ['JOB_COMPLETION_INDEX'])"]
""")
    job = cluster.admin.wait_for(
        f"/apis/batch/v1/namespaces/{namespace}/jobs/indexed",
        lambda j: job_condition(j, "Complete") or job_condition(j, "Failed"),
        timeout=90,
    )
    assert job_condition(job, "Complete"), job["status"]
    assert job["status"]["succeeded"] == 2
    pods = cluster.admin.get(
        f"/api/v1/namespaces/{namespace}/pods", labelSelector="batch.kubernetes.io/job-name=indexed"
    )["items"]
    outputs = set()
    for p in pods:
        assert p["status"]["phase"] == "Succeeded"
        assert p["spec"]["nodeName"] == node_agent.name
        assert p["status"]["podIP"].startswith("127.")
        outputs.add(node_agent.logs(namespace, p["metadata"]["name"]).strip())
    assert outputs == {"index 0", "index 1"}


def test_failed_pod_reports_exit_code_and_termination_message(
    cluster: Cluster, node_agent: NodeAgent, namespace: str
) -> None:
    cluster.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: fails, namespace: {namespace}}}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: ignored
    command: [{PY}, -c, "open('/dev/termination-log', 'w').write('model not found'); raise SystemExit(3)"]
""")
    pod = cluster.admin.wait_for(
        f"/api/v1/namespaces/{namespace}/pods/fails", pod_phase_in("Succeeded", "Failed"), timeout=60
    )
    assert pod["status"]["phase"] == "Failed"
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 3
    assert term["reason"] == "Error"
    assert term["message"] == "model not found"
    conds = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert conds["PodScheduled"] == "True" and conds["Ready"] == "False"


def test_env_volumes_and_mount_path_rewriting(
    cluster: Cluster, node_agent: NodeAgent, namespace: str
) -> None:
    cluster.kubectl("create", "secret", "generic", "creds", "--from-literal=token=s3cr3t", "-n", namespace)
    cluster.kubectl("create", "configmap", "cfg", "--from-literal=config.yaml=lr: 0.1", "-n", namespace)
    cluster.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: env, namespace: {namespace}, labels: {{app: env}}}}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: ignored
    command: [{PY}, -c]
    args:
    - |
      import json, os
      print(json.dumps({{"token": os.environ["TOKEN"], "pod": os.environ["POD"], "ip": os.environ["IP"],
                        "cfg": open("/etc/kubetune/config.yaml").read(), "cfgpath": os.environ["CFG"],
                        "scratch": os.path.isdir("/scratch/x/..")}}))
    env:
    - {{name: TOKEN, valueFrom: {{secretKeyRef: {{name: creds, key: token}}}}}}
    - {{name: POD, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
    - {{name: IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}
    - {{name: CFG, value: /etc/kubetune/config.yaml}}
    volumeMounts:
    - {{name: cfg, mountPath: /etc/kubetune}}
    - {{name: scratch, mountPath: /scratch}}
  volumes:
  - {{name: cfg, configMap: {{name: cfg}}}}
  - {{name: scratch, emptyDir: {{}}}}
""")
    pod = cluster.admin.wait_for(
        f"/api/v1/namespaces/{namespace}/pods/env", pod_phase_in("Succeeded", "Failed"), timeout=60
    )
    out = node_agent.logs(namespace, "env")
    assert pod["status"]["phase"] == "Succeeded", out
    got = json.loads(out)
    assert got["token"] == "s3cr3t" and got["pod"] == "env" and got["cfg"] == "lr: 0.1"
    assert got["ip"] == pod["status"]["podIP"]
    assert got["cfgpath"].endswith("/volumes/cfg/config.yaml")


def test_missing_secret_keeps_pod_waiting(cluster: Cluster, node_agent: NodeAgent, namespace: str) -> None:
    cluster.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: nosecret, namespace: {namespace}}}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: ignored
    command: [{PY}, -c, "print(1)"]
    env:
    - {{name: T, valueFrom: {{secretKeyRef: {{name: absent, key: token}}}}}}
""")

    def waiting(p: Obj) -> bool:
        cs = p.get("status", {}).get("containerStatuses") or [{}]
        return cs[0].get("state", {}).get("waiting", {}).get("reason") == "CreateContainerConfigError"

    pod = cluster.admin.wait_for(f"/api/v1/namespaces/{namespace}/pods/nosecret", waiting, timeout=60)
    assert pod["status"]["phase"] == "Pending"
    assert "absent" in pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]


def test_delete_sends_sigterm_then_removes_pod(
    cluster: Cluster, node_agent: NodeAgent, namespace: str
) -> None:
    cluster.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: sleeper, namespace: {namespace}}}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 20
  containers:
  - name: main
    image: ignored
    command: [{PY}, -c]
    args:
    - |
      import signal, sys, time
      def term(*_):
          print("got SIGTERM, checkpointing", flush=True)
          sys.exit(0)
      signal.signal(signal.SIGTERM, term)
      print("running", flush=True)
      time.sleep(600)
""")
    cluster.admin.wait_for(
        f"/api/v1/namespaces/{namespace}/pods/sleeper", pod_phase_in("Running"), timeout=60
    )
    time.sleep(1)  # let the handler install
    t0 = time.monotonic()
    cluster.kubectl("delete", "pod", "sleeper", "-n", namespace, "--wait=false")
    wait_gone(cluster, f"/api/v1/namespaces/{namespace}/pods/sleeper", timeout=30)
    assert time.monotonic() - t0 < 15, "graceful exit should not wait for the whole grace period"
    assert "got SIGTERM" in node_agent.logs(namespace, "sleeper")


def test_node_is_registered_ready_with_gpus(cluster: Cluster, node_agent: NodeAgent) -> None:
    node = cluster.admin.get(f"/api/v1/nodes/{node_agent.name}")
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "8"
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    lease = cluster.admin.get(
        f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node_agent.name}"
    )
    assert lease["spec"]["holderIdentity"] == node_agent.name
    # NodeRestriction: the node identity may not touch other nodes
    r = cluster.kubectl(
        "auth",
        "can-i",
        "delete",
        "nodes/other",
        "--as",
        f"system:node:{node_agent.name}",
        "--as-group",
        "system:nodes",
        check=False,
    )
    assert r.stdout.strip() == "no"


def test_on_failure_restarts_container_and_keeps_emptydir(
    cluster: Cluster, node_agent: NodeAgent, namespace: str
) -> None:
    cluster.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: flaky, namespace: {namespace}}}
spec:
  restartPolicy: OnFailure
  containers:
  - name: main
    image: ignored
    command: [{PY}, -c]
    args:
    - |
      import os
      p = "/data/attempts"
      n = int(open(p).read()) if os.path.exists(p) else 0
      open(p, "w").write(str(n + 1))
      print("attempt", n)
      raise SystemExit(0 if n else 1)
    volumeMounts: [{{name: data, mountPath: /data}}]
  volumes: [{{name: data, emptyDir: {{}}}}]
""")
    pod = cluster.admin.wait_for(
        f"/api/v1/namespaces/{namespace}/pods/flaky", pod_phase_in("Succeeded", "Failed"), timeout=60
    )
    assert pod["status"]["phase"] == "Succeeded"
    cs = pod["status"]["containerStatuses"][0]
    assert cs["restartCount"] == 1
    assert cs["lastState"]["terminated"]["exitCode"] == 1
    assert node_agent.logs(namespace, "flaky", restart=0).strip() == "attempt 0"
    assert node_agent.logs(namespace, "flaky").strip() == "attempt 1"


def test_scheduling_gates_hold_pods_pending(cluster: Cluster, node_agent: NodeAgent, namespace: str) -> None:
    cluster.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: gated, namespace: {namespace}}}
spec:
  restartPolicy: Never
  schedulingGates: [{{name: kueue.x-k8s.io/admission}}]
  containers:
  - {{name: main, image: ignored, command: [{PY}, -c, "print('admitted')"]}}
""")
    time.sleep(3)
    pod = cluster.admin.get(f"/api/v1/namespaces/{namespace}/pods/gated")
    assert not pod["spec"].get("nodeName") and pod["status"]["phase"] == "Pending"
    cluster.kubectl(
        "patch",
        "pod",
        "gated",
        "-n",
        namespace,
        "--type=json",
        "-p",
        '[{"op": "remove", "path": "/spec/schedulingGates"}]',
    )
    pod = cluster.admin.wait_for(
        f"/api/v1/namespaces/{namespace}/pods/gated", pod_phase_in("Succeeded", "Failed"), timeout=60
    )
    assert pod["status"]["phase"] == "Succeeded"


def test_the_children_kubetune_creates_go_with_their_finetunejob(cluster: Cluster, namespace: str) -> None:
    """kubetune cleans up by owner references alone (no finalizer, no delete handler): the Job, ConfigMap and
    Service the controller's own code creates for a FineTuneJob must carry an owner reference the API server's
    garbage collector follows. The controller's `ensure_children` runs here through a KubeClient against the
    real API server (no operator process, no node: the objects, not their pods, are the point). This replaces a
    test of the garbage collector on two ConfigMaps, which checked Kubernetes and nothing of kubetune."""
    from kubetune.api.validation import parse_spec  # noqa: PLC0415
    from kubetune.controller.kube import KubeClient  # noqa: PLC0415
    from kubetune.controller.reconcile import ensure_children  # noqa: PLC0415
    from kubetune.controller.settings import Settings  # noqa: PLC0415
    from kubetune.controller.store import Store  # noqa: PLC0415

    cluster.kubectl("apply", "--server-side", "-f", str(CRD))
    cluster.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=60s")
    spec = {
        "model": {"source": "s3://models/tiny"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/owned"},
        "storage": {"secretRef": {"name": "s3"}},
    }
    ftj = cluster.admin.post(
        f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs",
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "owned"},
            "spec": spec,
        },
    )
    kube = KubeClient(api=cluster.api_client())
    created = ensure_children(ftj, parse_spec(spec, name="owned"), 0, Store(), Settings(), kube)
    assert created == ["Job owned-r0", "ConfigMap owned-config", "Service owned"], created
    children = [
        f"/apis/batch/v1/namespaces/{namespace}/jobs/owned-r0",
        f"/api/v1/namespaces/{namespace}/configmaps/owned-config",
        f"/api/v1/namespaces/{namespace}/services/owned",
    ]
    for path in children:
        [owner] = cluster.admin.get(path)["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "FineTuneJob",
            "owned",
            ftj["metadata"]["uid"],
            True,
        ), path
    cluster.kubectl("delete", "finetunejob", "owned", "-n", namespace, "--wait=false")
    for path in children:
        wait_gone(cluster, path, timeout=60)


def test_pods_reach_each_other_by_hostname_and_subdomain(
    cluster: Cluster, node_agent: NodeAgent, namespace: str
) -> None:
    port = free_port()
    server = f"""
import socket
s = socket.create_server(("0.0.0.0", {port}))
conn, _ = s.accept()
conn.sendall(b"hello from rank 0 " + conn.recv(100))
conn.close()
"""
    client = f"""
import socket, time
for _ in range(300):
    try:
        c = socket.create_connection(("rank-0.rdv", {port}), timeout=2)
        break
    except OSError as e:
        err = e
        time.sleep(0.2)
else:
    raise SystemExit(f"could not connect: {{err}}")
c.sendall(b"rank 1")
print(c.recv(100).decode())
"""
    cluster.apply(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": [
                    {
                        "apiVersion": "v1",
                        "kind": "Service",
                        "metadata": {"name": "rdv", "namespace": namespace},
                        "spec": {
                            "clusterIP": "None",
                            "selector": {"app": "rdv"},
                            "publishNotReadyAddresses": True,
                        },
                    },
                    *(
                        {
                            "apiVersion": "v1",
                            "kind": "Pod",
                            "metadata": {"name": name, "namespace": namespace, "labels": {"app": "rdv"}},
                            "spec": {
                                "hostname": name,
                                "subdomain": "rdv",
                                "restartPolicy": "Never",
                                "containers": [
                                    {"name": "main", "image": "ignored", "command": [PY, "-c", code]}
                                ],
                            },
                        }
                        for name, code in (("rank-0", server), ("rank-1", client))
                    ),
                ],
            }
        )
    )
    for name in ("rank-0", "rank-1"):
        pod = cluster.admin.wait_for(
            f"/api/v1/namespaces/{namespace}/pods/{name}", pod_phase_in("Succeeded", "Failed"), timeout=90
        )
        assert pod["status"]["phase"] == "Succeeded", node_agent.logs(namespace, name)
    assert node_agent.logs(namespace, "rank-1").strip() == "hello from rank 0 rank 1"


def test_s3_refuses_wrong_secret(s3: S3Server) -> None:
    if not s3.enforces_credentials:
        pytest.skip(f"{s3.kind} does not check credentials")
    from botocore.exceptions import ClientError  # noqa: PLC0415

    ok = s3.client()
    ok.put_object(Bucket=s3.bucket, Key="hello.txt", Body=b"hi")
    assert ok.get_object(Bucket=s3.bucket, Key="hello.txt")["Body"].read() == b"hi"
    with pytest.raises(ClientError) as e:
        s3.client(secret_key="not-the-secret").get_object(Bucket=s3.bucket, Key="hello.txt")
    assert e.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "AccessDenied")
    with pytest.raises(ClientError) as e:
        s3.client(access_key="nobody", secret_key="whatever1").list_objects_v2(Bucket=s3.bucket)
    assert e.value.response["Error"]["Code"] in ("InvalidAccessKeyId", "AccessDenied")


ALLREDUCE = """
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"rank {dist.get_rank()}/{dist.get_world_size()} sum {t.item():.0f}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_gloo_across_indexed_job_pods(
    cluster: Cluster, node_agent: NodeAgent, namespace: str
) -> None:
    """The operator's shape: Indexed Job + headless Service, torchrun --master-addr <job>-0.<svc>."""
    pytest.importorskip("torch")
    port = free_port()
    cluster.kubectl(
        "create", "configmap", "script", f"--from-literal=allreduce.py={ALLREDUCE}", "-n", namespace
    )
    cluster.apply(f"""
apiVersion: v1
kind: Service
metadata: {{name: ddp, namespace: {namespace}}}
spec: {{clusterIP: None, selector: {{job-name: ddp}}, publishNotReadyAddresses: true}}
---
apiVersion: batch/v1
kind: Job
metadata: {{name: ddp, namespace: {namespace}}}
spec:
  completions: 2
  parallelism: 2
  completionMode: Indexed
  backoffLimit: 0
  template:
    spec:
      subdomain: ddp
      restartPolicy: Never
      containers:
      - name: trainer
        image: ignored
        command: [torchrun, --nnodes=2, --nproc-per-node=1, --node-rank=$(JOB_COMPLETION_INDEX),
                  --master-addr=ddp-0.ddp, --master-port={port}, /opt/script/allreduce.py]
        volumeMounts: [{{name: script, mountPath: /opt/script}}]
      volumes: [{{name: script, configMap: {{name: script}}}}]
""")
    job = cluster.admin.wait_for(
        f"/apis/batch/v1/namespaces/{namespace}/jobs/ddp",
        lambda j: job_condition(j, "Complete") or job_condition(j, "Failed"),
        timeout=240,
    )
    pods = cluster.admin.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector="job-name=ddp")["items"]
    logs = {p["metadata"]["name"]: node_agent.logs(namespace, p["metadata"]["name"]) for p in pods}
    assert job_condition(job, "Complete"), logs
    assert sorted(line for out in logs.values() for line in out.splitlines() if line.startswith("rank ")) == [
        "rank 0/2 sum 3",
        "rank 1/2 sum 3",
    ]


def test_kill_container_fault_injection(cluster: Cluster, node_agent: NodeAgent, namespace: str) -> None:
    cluster.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: victim, namespace: {namespace}}}
spec:
  restartPolicy: Never
  containers:
  - {{name: main, image: ignored, command: [{PY}, -c, "import time; time.sleep(600)"]}}
""")
    cluster.admin.wait_for(f"/api/v1/namespaces/{namespace}/pods/victim", pod_phase_in("Running"), timeout=60)
    node_agent.kill_container(namespace, "victim")
    pod = cluster.admin.wait_for(
        f"/api/v1/namespaces/{namespace}/pods/victim", pod_phase_in("Succeeded", "Failed"), timeout=30
    )
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
