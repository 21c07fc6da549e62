"""A small fake kubelet (+ scheduler, + cluster DNS) that runs pods as local processes.

This is the one fake in the e2e harness. For one Node it does what the kubelet does,
talking to the real API server under the identities real components use:

* as ``system:node:<name>`` (group system:nodes, so the Node authorizer and the
  NodeRestriction admission plugin apply): registers the Node (cpu, memory, pods,
  ``nvidia.com/gpu``), renews its Lease in kube-node-lease, keeps the Ready condition
  fresh, reads the Secrets/ConfigMaps its pods reference, requests their
  service-account tokens, reports pod status and deletes terminated pods;
* as ``system:kube-scheduler``: binds pending pods with the default scheduler name,
  no scheduling gates, a matching nodeSelector, tolerated taints and requests that
  fit the node's allocatable resources (no affinity, no preemption);
* as a DNS add-on (its own ClusterRole, like CoreDNS): publishes headless Services'
  endpoints (``<hostname>.<service>[.<ns>[.svc[.cluster.local]]]`` and
  ``<service>.<ns>.svc[.cluster.local]``) into a marked block of /etc/hosts.

How a pod runs: its image is ignored; every container's command+args runs as a local
process group in this machine's environment (the venv's bin dir first on PATH), with
the container's env resolved like the kubelet does (value, $(VAR) expansion,
valueFrom secretKeyRef/configMapKeyRef/fieldRef/resourceFieldRef, envFrom), its
workingDir, and its volumes (configMap, secret, emptyDir, downwardAPI, projected incl.
the service-account token, hostPath, persistentVolumeClaim as a per-namespace dir)
materialised under a per-pod directory. Processes cannot bind-mount, so mount paths
are rewritten: every occurrence of a volumeMount's mountPath as a path prefix in
command, args, env values and workingDir is replaced by the local directory, and
``KUBETUNE_E2E_MOUNTS`` (JSON {mountPath: dir}) tells a program where a mount went.
The termination message path (default /dev/termination-log) is rewritten the same way
(also exported as ``KUBETUNE_E2E_TERMINATION_MESSAGE_PATH``).

Each pod gets its own loopback IP (127.N.x.y, N random per agent; all of 127/8 is loopback) as
status.podIP; processes share this machine's network namespace, so two pods must not
listen on the same port of 0.0.0.0 at the same time.

Why /etc/hosts for DNS: the operator points torchrun at ``<job>-0.<service>``; the only
faithful way to make that name resolve for unmodified programs (glibc getaddrinfo,
torch's TCPStore, Python's socket) without a DNS server and resolv.conf changes is
the hosts file, which glibc re-reads on every lookup. Rewriting names inside args
would hide bugs (e.g. a wrong service name would "work"). Entries are derived from the
headless Services and the pods they select, exactly as the EndpointSlice controller
selects them (the API server refuses loopback IPs in EndpointSlices, so the real
slices stay empty), so a missing/mis-selecting headless Service fails like in a cluster. It needs write access to /etc/hosts (root: CI and the
dev container run as root); the block is removed on stop and stale blocks from crashed
runs are cleaned on start. Search domains do not apply to /etc/hosts, so the short
forms are written out; they are not namespaced (use distinct names across namespaces).

Logs: ``kubectl logs`` does not work (no kubelet API server). Each container's
stdout+stderr goes to ``<workdir>/pods/<ns>_<pod>_<uid>/logs/<container>/<restart>.log``
(``NodeAgent.logs(ns, pod)`` reads them). Restart back-off is compressed (1 s doubling,
max 10 s) so tests do not wait minutes.
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .kube import MERGE, ApiError, Credentials, Kube, Obj

log = logging.getLogger("kubetune.e2e.node_agent")

HOSTS_BEGIN = "# BEGIN kubetune-e2e node agent"
HOSTS_END = "# END kubetune-e2e node agent"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_SUFFIX = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "m": 1e-3,
}


def quantity(q: str | int | float) -> float:
    """Parse a Kubernetes resource quantity ("500m", "2Gi", "1e3") into a number."""
    s = str(q)
    for suf in sorted(_SUFFIX, key=len, reverse=True):
        if s.endswith(suf):
            return float(s[: -len(suf)]) * _SUFFIX[suf]
    return float(s)


class NotReady(Exception):
    """A referenced object is missing; the kubelet keeps the container waiting."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion; $$ escapes, unknown references stay as they are."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        s,
    )


def _rewrite(s: str, mounts: list[tuple[str, str]]) -> str:
    """Replace mount paths used as path prefixes (longest first) by local directories."""
    for src, dst in mounts:
        s = re.sub(re.escape(src.rstrip("/")) + r"(?=/|$|[\s:;,='\"])", dst, s)
    return s


@dataclass
class Running:
    name: str
    popen: subprocess.Popen[bytes]
    started: str
    log: Path
    term_path: Path


@dataclass
class ContainerState:
    restarts: int = 0
    status: Obj = field(default_factory=dict)  # the containerStatuses entry


class PodRunner(threading.Thread):
    """Runs one pod bound to the node, from admission to deletion."""

    def __init__(self, agent: NodeAgent, pod: Obj) -> None:
        super().__init__(daemon=True, name=f"pod-{pod['metadata']['name']}")
        self.agent = agent
        self.pod = pod
        md = pod["metadata"]
        self.ns, self.name, self.uid = md["namespace"], md["name"], md["uid"]
        self.dir = agent.pods_dir / f"{self.ns}_{self.name}_{self.uid}"
        self.delete_grace: float | None = None  # set when deletionTimestamp is seen
        self.gone = False  # pod object vanished (force delete): just kill
        self.ip = agent.allocate_ip()
        self.states: dict[str, ContainerState] = {}
        self.running: dict[str, Running] = {}
        self.finished = False
        self.start_time = now()
        self.path = f"/api/v1/namespaces/{self.ns}/pods/{self.name}"

    # -- status ------------------------------------------------------------------------
    def _patch_status(self, phase: str, ready: bool, initialized: bool, message: str = "") -> None:
        t = now()
        spec = self.pod["spec"]
        conds: list[Obj] = [
            {"type": "PodReadyToStartContainers", "status": "True"},
            {"type": "Initialized", "status": str(initialized)},
            {"type": "ContainersReady", "status": str(ready)},
            {"type": "Ready", "status": str(ready)},
        ]
        for c in conds:
            c["lastTransitionTime"] = t
            c["lastProbeTime"] = None
        status: Obj = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "qosClass": self.pod.get("status", {}).get("qosClass", "BestEffort"),
            "conditions": conds,
            "containerStatuses": [self._cstatus(c) for c in spec["containers"]],
        }
        if spec.get("initContainers"):
            status["initContainerStatuses"] = [self._cstatus(c) for c in spec["initContainers"]]
        if message:
            status["message"] = message
        # only transition times of conditions whose status changed should move; good enough
        old = {c["type"]: c for c in self.pod.get("status", {}).get("conditions", [])}
        for c in conds:
            if old.get(c["type"], {}).get("status") == c["status"]:
                c["lastTransitionTime"] = old[c["type"]].get("lastTransitionTime", t)
        try:
            self.pod = self.agent.node.patch(self.path + "/status", {"status": status})
        except ApiError as e:
            if e.status != 404:
                raise

    def _cstatus(self, c: Obj) -> Obj:
        st = self.states.setdefault(c["name"], ContainerState())
        if not st.status:
            st.status = {"state": {"waiting": {"reason": "ContainerCreating"}}}
        return {
            "name": c["name"],
            "image": c.get("image", ""),
            "imageID": "",
            "restartCount": st.restarts,
            "ready": "running" in st.status["state"],
            "started": "running" in st.status["state"],
            **st.status,
        }

    def _set_waiting(self, containers: list[Obj], reason: str, message: str) -> None:
        for c in containers:
            self.states.setdefault(c["name"], ContainerState()).status = {
                "state": {"waiting": {"reason": reason, "message": message}}
            }

    # -- lifecycle ---------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except Exception as e:
            log.exception("pod %s/%s: runner crashed", self.ns, self.name)
            self.agent.errors.append(f"pod {self.ns}/{self.name}: {e!r}")
            try:  # show it on the pod, as the kubelet shows CreateContainerError
                self._set_waiting(self._all_containers(), "CreateContainerError", repr(e))
                self._patch_status("Pending", False, False, message=repr(e))
            except Exception:
                log.exception("pod %s/%s: could not report the crash", self.ns, self.name)
        finally:
            self._kill_all(0)
            self.finished = True

    def _stopping(self) -> bool:
        return self.delete_grace is not None or self.gone

    def _run(self) -> None:
        spec = self.pod["spec"]
        inits, mains = spec.get("initContainers") or [], spec["containers"]
        self._patch_status("Pending", False, not inits)
        # volumes and env; missing references keep containers waiting, like the kubelet
        while not self._stopping():
            try:
                mounts_by_volume = self.agent.materialise_volumes(self)
                envs = {c["name"]: self.agent.container_env(self, c) for c in inits + mains}
                break
            except (NotReady, ApiError) as e:
                reason = e.reason if isinstance(e, NotReady) else "ContainerCreating"
                self._set_waiting(inits + mains, reason, str(e))
                self._patch_status("Pending", False, not inits)
                time.sleep(2)
        else:
            return self._terminate()
        policy = spec.get("restartPolicy", "Always")
        for c in inits:
            while True:
                if self._stopping():
                    return self._terminate()
                self._start(c, envs[c["name"]], mounts_by_volume)
                self._patch_status("Pending", False, False)
                code = self._wait_one(c["name"])
                if code is None:
                    return self._terminate()
                self._patch_status("Pending", False, False)
                if code == 0:
                    break
                if policy == "Never":
                    self._patch_status("Failed", False, False)
                    return self._wait_for_deletion()
                self._backoff(c["name"])
        for c in mains:
            self._start(c, envs[c["name"]], mounts_by_volume)
        self._patch_status("Running", True, True)
        while self.running:
            if self._stopping():
                return self._terminate()
            changed = False
            for name in list(self.running):
                code = self.running[name].popen.poll()
                if code is None:
                    continue
                self._record_exit(name, code)
                changed = True
                if policy == "Always" or (policy == "OnFailure" and code != 0):
                    self._patch_status("Running", False, True)
                    self._backoff(name)
                    if self._stopping():
                        return self._terminate()
                    c = next(x for x in mains if x["name"] == name)
                    self._start(c, envs[name], mounts_by_volume)
            if changed:
                self._patch_status("Running", len(self.running) == len(mains), True)
            time.sleep(0.2)
        self._patch_status(self._final_phase(), False, True)
        self._wait_for_deletion()

    def _final_phase(self) -> str:
        codes = [
            st.status["state"].get("terminated", {}).get("exitCode", 1)
            for n, st in self.states.items()
            if n in {c["name"] for c in self.pod["spec"]["containers"]}
        ]
        return "Succeeded" if all(c == 0 for c in codes) else "Failed"

    def _backoff(self, name: str) -> None:
        delay = min(10.0, 2.0 ** self.states[name].restarts)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not self._stopping():
            time.sleep(0.2)
        self.states[name].restarts += 1

    def _wait_one(self, name: str) -> int | None:
        while not self._stopping():
            code = self.running[name].popen.poll()
            if code is not None:
                self._record_exit(name, code)
                return code
            time.sleep(0.2)
        return None

    def _wait_for_deletion(self) -> None:
        while not self._stopping():
            time.sleep(0.2)
        self._terminate()

    def _terminate(self) -> None:
        """deletionTimestamp seen: SIGTERM, wait the grace period, SIGKILL, delete (grace 0)."""
        if self.running:
            self._kill_all(self.delete_grace or 0)
            self._patch_status(self._final_phase(), False, True)
        if self.gone:
            return
        try:
            self.agent.node.request(
                "DELETE", self.path, {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}}
            )
        except ApiError as e:
            if e.status not in (404, 409):
                raise

    def _kill_all(self, grace: float) -> None:
        for r in self.running.values():
            if r.popen.poll() is None:
                _signal_group(r.popen, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for r in self.running.values():
            try:
                r.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(r.popen, signal.SIGKILL)
                r.popen.wait()
        for name in list(self.running):
            self._record_exit(name, self.running[name].popen.returncode)

    # -- containers --------------------------------------------------------------------
    def _start(self, c: Obj, env: dict[str, str], mounts_by_volume: dict[str, Path]) -> None:
        name = c["name"]
        st = self.states.setdefault(name, ContainerState())
        cdir = self.dir / "containers" / name
        cdir.mkdir(parents=True, exist_ok=True)
        term_path = cdir / "termination-log"
        term_path.write_text("")
        mounts: list[tuple[str, str]] = []
        for m in c.get("volumeMounts") or []:
            local = mounts_by_volume[m["name"]] / m.get("subPath", "")
            mounts.append((m["mountPath"], str(local)))
        mounts.append((c.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH, str(term_path)))
        mounts.sort(key=lambda m: len(m[0]), reverse=True)
        full_env = {k: _rewrite(v, mounts) for k, v in env.items()}
        full_env["KUBETUNE_E2E_MOUNTS"] = json.dumps(dict(mounts))
        full_env["KUBETUNE_E2E_TERMINATION_MESSAGE_PATH"] = str(term_path)
        argv = [_rewrite(_expand(a, env), mounts) for a in (c.get("command") or []) + (c.get("args") or [])]
        workdir = Path(_rewrite(c["workingDir"], mounts)) if c.get("workingDir") else cdir / "cwd"
        workdir.mkdir(parents=True, exist_ok=True)
        logf = self.dir / "logs" / name / f"{st.restarts}.log"
        logf.parent.mkdir(parents=True, exist_ok=True)
        if not argv:
            raise RuntimeError(f"container {name}: no command/args (images are not run)")
        with open(logf, "wb") as out:
            popen = subprocess.Popen(
                argv,
                env=full_env,
                cwd=workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        started = now()
        self.running[name] = Running(name, popen, started, logf, term_path)
        last = st.status.get("state", {}) if "terminated" in st.status.get("state", {}) else {}
        st.status = {
            "state": {"running": {"startedAt": started}},
            "lastState": last,
            "containerID": f"kubetune-e2e://{self.uid}/{name}/{popen.pid}",
        }

    def _record_exit(self, name: str, code: int | None) -> None:
        r = self.running.pop(name, None)
        if r is None:
            return
        code = 128 - code if code is not None and code < 0 else code  # -15 -> 143
        code = 137 if code is None else code
        c = next(x for x in self._all_containers() if x["name"] == name)
        message = r.term_path.read_text(errors="replace")[:4096]
        if not message and code != 0 and c.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            lines = r.log.read_text(errors="replace").splitlines()[-80:]
            message = "\n".join(lines)[-2048:]
        term: Obj = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": r.started,
            "finishedAt": now(),
            "containerID": f"kubetune-e2e://{self.uid}/{name}/{r.popen.pid}",
        }
        if message:
            term["message"] = message
        st = self.states[name]
        st.status = {
            "state": {"terminated": term},
            "lastState": st.status.get("lastState", {}),
            "containerID": term["containerID"],
        }
        log.info("pod %s/%s container %s exited %s", self.ns, self.name, name, code)

    def _all_containers(self) -> list[Obj]:
        return (self.pod["spec"].get("initContainers") or []) + self.pod["spec"]["containers"]


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(p: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


class NodeAgent:
    """Registers one Node and runs the pods bound to it; see the module docstring."""

    def __init__(
        self,
        *,
        node: Credentials,
        scheduler: Credentials,
        dns: Credentials,
        workdir: Path,
        name: str = "e2e-node",
        capacity: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        hosts_file: Path = Path("/etc/hosts"),
        path_prefix: list[str] | None = None,
    ) -> None:
        self.name = name
        self.node = Kube(node)
        self.sched = Kube(scheduler)
        self.dns = Kube(dns)
        self.workdir = workdir
        self.pods_dir = workdir / "pods"
        self.pods_dir.mkdir(parents=True, exist_ok=True)
        self.capacity = {
            "cpu": "16",
            "memory": "64Gi",
            "pods": "110",
            "nvidia.com/gpu": "8",
            "ephemeral-storage": "100Gi",
            **(capacity or {}),
        }
        self.labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **(labels or {}),
        }
        self.hosts_file = hosts_file
        self.path_prefix = path_prefix if path_prefix is not None else [str(Path(sys.executable).parent)]
        self.runners: dict[str, PodRunner] = {}
        self._ip_next = 0
        self._ip_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="node-agent")
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, daemon=True, name="node-heartbeat")
        self._last_heartbeat = 0.0
        # a random second octet keeps pod IPs of concurrent agents (other test runs) apart
        self._ip_octet = random.randint(1, 254)
        self._ready_since = now()
        self.errors: list[str] = []

    # -- public ------------------------------------------------------------------------
    def start(self) -> NodeAgent:
        self._write_hosts([])  # clean stale blocks, check we can write
        self._register()
        self._thread.start()
        self._hb_thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._hb_thread.join(10)
        for r in list(self.runners.values()):
            r.gone = True
        for r in list(self.runners.values()):
            r.join(15)
        self._write_hosts([], final=True)

    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pod_dir(self, ns: str, pod: str) -> Path:
        """The newest local directory of pod <ns>/<pod> (volumes, logs, cwd)."""
        dirs = sorted(self.pods_dir.glob(f"{ns}_{pod}_*"), key=lambda p: p.stat().st_mtime)
        if not dirs:
            raise FileNotFoundError(f"no pod dir for {ns}/{pod} under {self.pods_dir}")
        return dirs[-1]

    def logs(self, ns: str, pod: str, container: str | None = None, restart: int | None = None) -> str:
        """What `kubectl logs` would print (stdout+stderr), read from the agent's log files."""
        d = self.pod_dir(ns, pod) / "logs"
        cdirs = [d / container] if container else sorted(d.iterdir())
        out = []
        for cd in cdirs:
            files = sorted(cd.glob("*.log"), key=lambda p: int(p.stem))
            if files:
                f = cd / f"{restart}.log" if restart is not None else files[-1]
                out.append(f.read_text(errors="replace"))
        return "".join(out)

    def pod_logs(self, ns: str, prefix: str) -> str:
        """stdout+stderr of every container of every pod whose name starts with `prefix`, deleted ones too."""
        return "".join(
            f.read_text(errors="replace")
            for d in sorted(self.pods_dir.glob(f"{ns}_{prefix}*"))
            for f in sorted((d / "logs").glob("*/*.log"))
        )

    def pod_endpoint(self, host_port: int) -> str:
        """`host:port` at which pods reach a host TCP port (pods share the host network here)."""
        return f"127.0.0.1:{host_port}"

    def kill_container(
        self, ns: str, pod: str, container: str | None = None, sig: int = signal.SIGKILL
    ) -> None:
        """Fault injection: signal a running container's process group (SIGKILL ~ OOM kill)."""
        for r in self.runners.values():
            if (r.ns, r.name) == (ns, pod):
                for name, run in list(r.running.items()):
                    if container in (None, name):
                        _signal_group(run.popen, sig)
                return
        raise KeyError(f"no running pod {ns}/{pod} on {self.name}")

    def allocate_ip(self) -> str:
        with self._ip_lock:
            n = self._ip_next
            self._ip_next += 1
        return f"127.{self._ip_octet}.{n // 250}.{1 + n % 250}"

    # -- node --------------------------------------------------------------------------
    def _node_status(self) -> Obj:
        t, since = now(), self._ready_since
        return {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.name},
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubetune e2e node agent is posting ready status",
                    "lastHeartbeatTime": t,
                    "lastTransitionTime": since,
                },
                *(
                    {
                        "type": ty,
                        "status": "False",
                        "reason": f"KubeletHas{r}",
                        "lastHeartbeatTime": t,
                        "lastTransitionTime": since,
                    }
                    for ty, r in (
                        ("MemoryPressure", "SufficientMemory"),
                        ("DiskPressure", "NoDiskPressure"),
                        ("PIDPressure", "SufficientPID"),
                    )
                ),
            ],
            "nodeInfo": {
                "kubeletVersion": "v1.32.2-kubetune-e2e",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "kubetune-e2e://local-processes",
                "osImage": "local",
                "kernelVersion": os.uname().release,
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }

    def _register(self) -> None:
        try:
            node = self.node.post(
                "/api/v1/nodes",
                {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.name, "labels": self.labels}},
            )
        except ApiError as e:
            if e.status != 409:
                raise
            node = self.node.get(f"/api/v1/nodes/{self.name}")
        self.node.patch(f"/api/v1/nodes/{self.name}/status", {"status": self._node_status()})
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "namespace": "kube-node-lease",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": node["metadata"]["uid"]}
                ],
            },
            "spec": {"holderIdentity": self.name, "leaseDurationSeconds": 40, "renewTime": micro_now()},
        }
        try:
            self.node.post("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease)
        except ApiError as e:
            if e.status != 409:
                raise
        self._last_heartbeat = time.monotonic()

    def _heartbeat(self) -> None:
        self.node.patch(
            f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}",
            {"spec": {"renewTime": micro_now(), "holderIdentity": self.name}},
            MERGE,
        )
        self.node.patch(f"/api/v1/nodes/{self.name}/status", {"status": self._node_status()})

    # -- main loop ---------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            for step in (self._schedule, self._sync_pods, self._sync_dns):
                self._step(step)
            self._stop.wait(0.3)

    def _heartbeat_loop(self) -> None:
        # its own thread, so a slow sync (busy CPUs during training) never lets the Lease lapse
        while not self._stop.wait(1.0):
            self._step(self._maybe_heartbeat)

    def _step(self, step: Any) -> None:
        try:
            step()
        except Exception as e:  # keep going like a kubelet; remember for debugging
            log.exception("node agent step %s failed", step.__name__)
            self.errors = [*self.errors[-199:], f"{step.__name__}: {e}"]

    def _maybe_heartbeat(self) -> None:
        if time.monotonic() - self._last_heartbeat > 10:
            self._heartbeat()
            self._last_heartbeat = time.monotonic()

    def _schedule(self) -> None:
        pending = self.sched.get("/api/v1/pods", fieldSelector="spec.nodeName=,status.phase=Pending")
        if not pending["items"]:
            return
        node = self.sched.get(f"/api/v1/nodes/{self.name}")
        taints = node.get("spec", {}).get("taints") or []
        bound = self.sched.get("/api/v1/pods", fieldSelector=f"spec.nodeName={self.name}")
        used = [p for p in bound["items"] if p["status"].get("phase") not in ("Succeeded", "Failed")]
        for pod in pending["items"]:
            spec, md = pod["spec"], pod["metadata"]
            if (
                md.get("deletionTimestamp")
                or spec.get("schedulingGates")
                or spec.get("schedulerName", "default-scheduler") != "default-scheduler"
            ):
                continue
            if any(self.labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
                continue
            if not all(
                _tolerated(t, spec.get("tolerations") or [])
                for t in taints
                if t.get("effect") in ("NoSchedule", "NoExecute")
            ):
                continue
            if not self._fits(pod, used):
                continue
            try:
                self.sched.post(
                    f"/api/v1/namespaces/{md['namespace']}/pods/{md['name']}/binding",
                    {
                        "apiVersion": "v1",
                        "kind": "Binding",
                        "metadata": {"name": md["name"], "uid": md["uid"]},
                        "target": {"apiVersion": "v1", "kind": "Node", "name": self.name},
                    },
                )
                used.append(pod)
            except ApiError as e:
                if e.status not in (404, 409):
                    raise

    def _fits(self, pod: Obj, used: list[Obj]) -> bool:
        if len(used) + 1 > quantity(self.capacity["pods"]):
            return False
        for res, cap in self.capacity.items():
            if res == "pods":
                continue
            need = sum(_requests(p).get(res, 0.0) for p in [*used, pod])
            if need > quantity(cap):
                return False
        return True

    def _sync_pods(self) -> None:
        pods = self.node.get("/api/v1/pods", fieldSelector=f"spec.nodeName={self.name}")["items"]
        seen = set()
        for pod in pods:
            md = pod["metadata"]
            uid = md["uid"]
            seen.add(uid)
            r = self.runners.get(uid)
            if r is None:
                if md.get("deletionTimestamp") or pod["status"].get("phase") in ("Succeeded", "Failed"):
                    if md.get("deletionTimestamp"):
                        self._force_delete(pod)
                    continue
                r = self.runners[uid] = PodRunner(self, pod)
                r.start()
            elif md.get("deletionTimestamp") and r.finished and not r.is_alive():
                self._force_delete(pod)  # the runner is gone (crashed): nobody else will
            elif md.get("deletionTimestamp") and r.delete_grace is None:
                r.delete_grace = float(
                    md.get("deletionGracePeriodSeconds")
                    or pod["spec"].get("terminationGracePeriodSeconds")
                    or 0
                )
        for uid, r in list(self.runners.items()):
            if uid not in seen:
                r.gone = True
                if r.finished:
                    del self.runners[uid]

    def _force_delete(self, pod: Obj) -> None:
        md = pod["metadata"]
        try:
            self.node.request(
                "DELETE",
                f"/api/v1/namespaces/{md['namespace']}/pods/{md['name']}",
                {"gracePeriodSeconds": 0, "preconditions": {"uid": md["uid"]}},
            )
        except ApiError as e:
            if e.status not in (404, 409):
                raise

    # -- DNS -----------------------------------------------------------------------------
    def _sync_dns(self) -> None:
        # The EndpointSlice controller runs, but the API server refuses loopback addresses in
        # EndpointSlices ("may not be in the loopback range"), so the records are derived the
        # way that controller would: headless Service -> pods its selector matches in its
        # namespace (ready ones, or all with publishNotReadyAddresses) -> hostname records
        # for pods whose spec.subdomain names the Service.
        services = self.dns.get("/api/v1/services")["items"]
        pods = self.dns.get("/api/v1/pods")["items"]
        entries: list[tuple[str, list[str]]] = []
        for svc in services:
            ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
            selector = svc["spec"].get("selector") or {}
            if svc["spec"].get("clusterIP") != "None" or not selector:
                continue  # ClusterIP services are not routable here: only headless ones resolve
            publish_not_ready = svc["spec"].get("publishNotReadyAddresses", False)
            for pod in pods:
                md, st = pod["metadata"], pod.get("status", {})
                labels = md.get("labels") or {}
                if (
                    md["namespace"] != ns
                    or any(labels.get(k) != v for k, v in selector.items())
                    or not st.get("podIP")
                    or md.get("deletionTimestamp")
                    or st.get("phase") in ("Succeeded", "Failed")
                ):
                    continue
                ready = any(
                    c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions") or []
                )
                if not (ready or publish_not_ready):
                    continue
                base = f"{name}.{ns}"
                names = [f"{base}.svc.cluster.local", f"{base}.svc"]
                host = pod["spec"].get("hostname")
                if host and pod["spec"].get("subdomain") == name:
                    h = f"{host}.{name}"
                    names = [f"{h}.{ns}.svc.cluster.local", f"{h}.{ns}.svc", f"{h}.{ns}", h, *names]
                entries.append((st["podIP"], names))
        self._write_hosts(sorted(entries))

    def _write_hosts(self, entries: list[tuple[str, list[str]]], final: bool = False) -> None:
        """Replace this agent's block in the hosts file (under flock, in place: /etc/hosts may be
        a bind mount). Blocks of other live agents are kept; those of dead processes dropped."""
        block = "".join(f"{ip}\t{' '.join(names)}\n" for ip, names in entries)
        with open(self.hosts_file, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            text = f.read()
            kept, skipping = [], False
            for line in text.splitlines(keepends=True):
                if line.startswith(HOSTS_BEGIN):
                    pid = int(m.group(1)) if (m := re.search(r"pid (\d+)", line)) else 0
                    skipping = pid == os.getpid() or not _alive(pid)
                    if not skipping:
                        kept.append(line)
                elif line.startswith(HOSTS_END):
                    if not skipping:
                        kept.append(line)
                    skipping = False
                elif not skipping:
                    kept.append(line)
            new = "".join(kept)
            if block and not final:
                if new and not new.endswith("\n"):
                    new += "\n"
                new += f"{HOSTS_BEGIN} {self.name} pid {os.getpid()}\n{block}{HOSTS_END}\n"
            if new != text:
                f.seek(0)
                f.write(new)
                f.truncate()

    # -- volumes and env -------------------------------------------------------------------
    def _get_ref(self, kind: str, ns: str, name: str, optional: bool) -> Obj | None:
        path = f"/api/v1/namespaces/{ns}/{kind}/{name}"
        try:
            return self.node.get(path)
        except ApiError as e:
            # the Node authorizer's graph may lag the binding by a moment: 403 is retried too
            if e.status in (403, 404):
                if optional and e.status == 404:
                    return None
                singular = "secret" if kind == "secrets" else "configmap"
                raise NotReady("CreateContainerConfigError", f'{singular} "{name}" not found') from None
            raise

    def _data(self, obj: Obj | None) -> dict[str, bytes]:
        if obj is None:
            return {}
        if obj.get("kind") == "Secret":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return out

    def _field(self, r: PodRunner, path: str) -> str:
        md = r.pod["metadata"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return str((md.get(m.group(1)) or {}).get(m.group(2), ""))
        if path in ("metadata.labels", "metadata.annotations"):
            d = md.get(path.split(".")[1]) or {}
            return "".join(f'{k}="{v}"\n' for k, v in sorted(d.items()))
        return {
            "metadata.name": r.name,
            "metadata.namespace": r.ns,
            "metadata.uid": r.uid,
            "spec.nodeName": self.name,
            "spec.serviceAccountName": r.pod["spec"].get("serviceAccountName", ""),
            "status.podIP": r.ip,
            "status.podIPs": r.ip,
            "status.hostIP": "127.0.0.1",
            "status.hostIPs": "127.0.0.1",
        }[path]

    def _resource_field(self, r: PodRunner, ref: Obj, c: Obj | None) -> str:
        res = ref["resource"]
        kind, _, name = res.partition(".")
        val = ((c or {}).get("resources", {}).get(kind) or {}).get(name) or self.capacity.get(name, "0")
        divisor = quantity(ref.get("divisor", "1"))
        v = quantity(val) / divisor
        return str(int(-(-v // 1)))  # ceil, like the kubelet

    def _items(
        self, data: dict[str, bytes], items: list[Obj] | None, what: str, optional: bool
    ) -> dict[str, bytes]:
        if not items:
            return data
        out = {}
        for it in items:
            if it["key"] not in data:
                if optional:
                    continue
                raise NotReady("ContainerCreating", f'{what}: key "{it["key"]}" not found')
            out[it["path"]] = data[it["key"]]
        return out

    def _write_files(self, d: Path, files: dict[str, bytes]) -> None:
        d.mkdir(parents=True, exist_ok=True)
        for rel, content in files.items():
            p = d / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content)

    def _source_files(self, r: PodRunner, src: Obj) -> dict[str, bytes]:
        """Files of one volume source (configMap, secret, downwardAPI, serviceAccountToken)."""
        if "configMap" in src or "secret" in src:
            kind = "configMap" if "configMap" in src else "secret"
            ref = src[kind]
            name = ref.get("name") or ref.get("secretName")
            optional = bool(ref.get("optional"))
            try:
                obj = self._get_ref("configmaps" if kind == "configMap" else "secrets", r.ns, name, optional)
            except NotReady as e:
                raise NotReady("ContainerCreating", f"MountVolume.SetUp failed: {e}") from None
            return self._items(self._data(obj), ref.get("items"), f"{kind} {name}", optional)
        if "downwardAPI" in src:
            return {
                it["path"]: (
                    self._field(r, it["fieldRef"]["fieldPath"])
                    if "fieldRef" in it
                    else self._resource_field(r, it["resourceFieldRef"], None)
                ).encode()
                for it in src["downwardAPI"].get("items") or []
            }
        if "serviceAccountToken" in src:
            t = src["serviceAccountToken"]
            sa = r.pod["spec"].get("serviceAccountName", "default")
            spec: Obj = {
                "expirationSeconds": t.get("expirationSeconds", 3607),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": r.name, "uid": r.uid},
            }
            if t.get("audience"):
                spec["audiences"] = [t["audience"]]
            tr = self.node.post(
                f"/api/v1/namespaces/{r.ns}/serviceaccounts/{sa}/token",
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
            )
            return {t["path"]: tr["status"]["token"].encode()}
        raise NotImplementedError(f"volume source {sorted(src)}")

    def materialise_volumes(self, r: PodRunner) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for v in r.pod["spec"].get("volumes") or []:
            name = v["name"]
            d = r.dir / "volumes" / name
            if "emptyDir" in v:
                d.mkdir(parents=True, exist_ok=True)
            elif "hostPath" in v:
                d = Path(v["hostPath"]["path"])
            elif "persistentVolumeClaim" in v:
                d = self.workdir / "pvcs" / r.ns / v["persistentVolumeClaim"]["claimName"]
                d.mkdir(parents=True, exist_ok=True)
            elif "projected" in v:
                files: dict[str, bytes] = {}
                for src in v["projected"].get("sources") or []:
                    files.update(self._source_files(r, src))
                self._write_files(d, files)
            else:
                kind = next((k for k in ("configMap", "secret", "downwardAPI") if k in v), None)
                if kind is None:
                    raise NotImplementedError(f"volume {name}: unsupported type {sorted(v)}")
                self._write_files(d, self._source_files(r, {kind: v[kind]}))
            out[name] = d
        return out

    def container_env(self, r: PodRunner, c: Obj) -> dict[str, str]:
        # the "image" environment is this machine's, minus credentials and test plumbing a
        # pod would not have (pods get S3/API credentials only through their spec)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AWS_", "KUBERNETES_", "PYTEST_", "KUBETUNE_E2E_")) and k != "KUBECONFIG"
        }
        env["PATH"] = os.pathsep.join([*self.path_prefix, env.get("PATH", "")])
        env["HOSTNAME"] = r.pod["spec"].get("hostname") or r.name
        own: dict[str, str] = {}
        for ef in c.get("envFrom") or []:
            kind = "configMapRef" if "configMapRef" in ef else "secretRef"
            ref = ef[kind]
            obj = self._get_ref(
                "configmaps" if kind == "configMapRef" else "secrets",
                r.ns,
                ref["name"],
                bool(ref.get("optional")),
            )
            for k, v in self._data(obj).items():
                own[ef.get("prefix", "") + k] = v.decode(errors="replace")
        for e in c.get("env") or []:
            if "valueFrom" not in e:
                own[e["name"]] = _expand(e.get("value", ""), own)
                continue
            vf = e["valueFrom"]
            if "fieldRef" in vf:
                own[e["name"]] = self._field(r, vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                own[e["name"]] = self._resource_field(r, vf["resourceFieldRef"], c)
            else:
                kind = "configMapKeyRef" if "configMapKeyRef" in vf else "secretKeyRef"
                ref = vf[kind]
                obj = self._get_ref(
                    "configmaps" if kind == "configMapKeyRef" else "secrets",
                    r.ns,
                    ref["name"],
                    bool(ref.get("optional")),
                )
                data = self._data(obj)
                if ref["key"] in data:
                    own[e["name"]] = data[ref["key"]].decode(errors="replace")
                elif not ref.get("optional"):
                    raise NotReady(
                        "CreateContainerConfigError",
                        f"couldn't find key {ref['key']} in {kind[:-6]} {r.ns}/{ref['name']}",
                    )
        env.update(own)
        return env


def _tolerated(taint: Obj, tolerations: list[Obj]) -> bool:
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and (not t.get("key") or t["key"] == taint["key"]):
            return True
        if t.get("key") == taint["key"] and t.get("value", "") == taint.get("value", ""):
            return True
    return False


def _requests(pod: Obj) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in pod["spec"]["containers"]:
        for k, v in ((c.get("resources") or {}).get("requests") or {}).items():
            out[k] = out.get(k, 0.0) + quantity(v)
    return out


def for_cluster(cluster: Any, workdir: Path, name: str | None = None, **kw: Any) -> NodeAgent:
    """A NodeAgent wired to a harness Cluster with node, scheduler and DNS identities."""
    name = name or cluster.node_name
    dns_user = "kubetune-e2e:dns"
    cluster.admin.request(
        "PUT",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles/kubetune-e2e-dns",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "kubetune-e2e-dns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["services", "endpoints", "pods"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        },
    )
    cluster.admin.request(
        "PUT",
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/kubetune-e2e-dns",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "kubetune-e2e-dns"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "kubetune-e2e-dns",
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": dns_user}],
        },
    )
    return NodeAgent(
        node=cluster.credentials_for(f"node-{name}", f"system:node:{name}", ("system:nodes",)),
        scheduler=cluster.credentials_for("scheduler", "system:kube-scheduler"),
        dns=cluster.credentials_for("dns", dns_user),
        workdir=workdir,
        name=name,
        **kw,
    )
