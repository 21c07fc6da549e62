"""The gang schedulers spec.scheduling.gang names: each one's PodGroup API and the marks its pods carry.

Facts about other projects, written once: render/gang.py builds PodGroups with them, status names the CRD a
cluster lacks. Each is checked against that project's published CRD (e2e/crds/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from kubetune.api.models import GangScheduler

COSCHEDULING_LABEL: Final = "scheduling.x-k8s.io/pod-group"
VOLCANO_ANNOTATION: Final = "scheduling.k8s.io/group-name"
KAI_ANNOTATION: Final = "pod-group-name"
KAI_QUEUE_LABEL: Final = "kai.scheduler/queue"


@dataclass(frozen=True)
class Flavor:
    """What one gang scheduler needs."""

    api_version: str
    plural: str
    scheduler_name: str
    """The scheduler's default name as its install deploys it (pods' schedulerName unless spec.schedulerName)."""

    @property
    def group(self) -> str:
        return self.api_version.split("/", 1)[0]

    @property
    def crd(self) -> str:
        """The CRD's name, e.g. podgroups.scheduling.x-k8s.io (what a cluster without it lacks)."""
        return f"{self.plural}.{self.group}"


FLAVORS: Final[dict[GangScheduler, Flavor]] = {
    # scheduler-plugins installs Coscheduling as a second scheduler under this name (manifests/install/charts).
    "coscheduling": Flavor("scheduling.x-k8s.io/v1alpha1", "podgroups", "scheduler-plugins-scheduler"),
    "volcano": Flavor("scheduling.volcano.sh/v1beta1", "podgroups", "volcano"),
    "kai": Flavor("scheduling.run.ai/v2alpha2", "podgroups", "kai-scheduler"),
}
