"""Which node runs the e2e suite's pods: `KUBETUNE_E2E_NODE`.

* `kubelet` (default): containerd + kubelet + kube-scheduler + CoreDNS in a private network + mount
  namespace, pods from the operator and trainer images built from this repository (kubelet_node.py);
* `agent`: the fast mode, a node agent that runs pods as local processes (node_agent.py).
"""

from __future__ import annotations

import os

MODES = ("kubelet", "agent")


def node_mode() -> str:
    mode = os.environ.get("KUBETUNE_E2E_NODE", "kubelet") or "kubelet"
    if mode not in MODES:
        raise ValueError(
            f"KUBETUNE_E2E_NODE={mode!r}: use kubelet (the real node, default) or agent (the fast node agent)"
        )
    return mode


NODE_MODE = node_mode()
