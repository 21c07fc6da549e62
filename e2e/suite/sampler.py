"""Background observation of a FineTuneJob: every phase and progress step the API server shows."""

from __future__ import annotations

import threading
import time
from typing import Any


class Sampler:
    """Polls the FineTuneJob (admin REST client, cheaper than kubectl) every `every` seconds."""

    def __init__(self, cluster: Any, ns: str, name: str, every: float = 0.3) -> None:
        self.path = f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs/{name}"
        self.cluster = cluster
        self.every = every
        self.phases: list[str] = []
        self.steps: list[int] = []
        self.samples: list[tuple[float, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample()  # the state the caller just waited for, which the last poll may have missed

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def _sample(self) -> None:
        try:
            obj = self.cluster.admin.get_or_none(self.path)
        except Exception:  # noqa: BLE001 - keep sampling through API hiccups
            obj = None
        status = (obj or {}).get("status") or {}
        if status:
            self.samples.append((time.monotonic(), status))
            ph = status.get("phase")
            if ph and (not self.phases or self.phases[-1] != ph):
                self.phases.append(ph)
            step = (status.get("progress") or {}).get("step")
            if step is not None and (not self.steps or self.steps[-1] != step):
                self.steps.append(int(step))

    def saw_in_order(self, *phases: str) -> bool:
        it = iter(self.phases)
        return all(any(p == q for q in it) for p in phases)

    def saw_restart(self) -> bool:
        """Restarting, or the gang going from Running back to Pending/Initializing and on to Running:
        Restarting can last less than one sample (with kube-scheduler the new gang is bound and
        starting within a second)."""
        return "Restarting" in self.phases or any(
            self.saw_in_order("Running", back, "Running") for back in ("Pending", "Initializing")
        )
