"""The hang watchdog end to end: rank 1 stops stepping (the trainer's test seam). With
runPolicy.progressDeadlineSeconds the stuck gang is reported Stalled with the ranks' Python stacks in
status.lastFailure, restarted from its last checkpoint, and (stuck again, backoffLimit 1) Failed, instead
of hanging in a collective until someone notices."""

from __future__ import annotations

import re
import sys

import pytest
from conftest import job_doc, wait_for
from sampler import Sampler

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NS_KEY = "faults"


def test_a_rank_that_stops_stepping_is_stalled_restarted_from_checkpoint_then_failed(
    cluster, kctl, suite_ns, s3, s3_data, node, operator
):
    name = "fault-stall"
    doc = job_doc(name, s3, s3_data, steps=40, checkpoint_steps=4, **{
        "runPolicy.backoffLimit": 1, "runPolicy.progressDeadlineSeconds": 10,
        "env": [{"name": "KUBETUNE_DEBUG_HANG_AT_STEP", "value": "6"}, {"name": "KUBETUNE_DEBUG_HANG_RANK", "value": "1"}],
    })  # fmt: skip
    with Sampler(cluster, suite_ns, name) as sampler:
        kctl.apply(suite_ns, doc)
        wait_for("Failed", lambda: kctl.phase(suite_ns, name) in ("Failed", "Succeeded"), 300, 1)
    status = kctl.status(suite_ns, name)
    print(
        f"\n[suite] {name}: phases {sampler.phases} steps {sampler.steps}; lastFailure {status.get('lastFailure')}",
        file=sys.stderr,
    )
    assert status["phase"] == "Failed" and status["restarts"] == 1, status
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded", failed
    lf = status["lastFailure"]
    assert lf["reason"] == "Stalled" and lf["exitCode"] == 77, lf
    # The first rank to give up: rank 1 (stack in the debug hook's hang_if_asked) or rank 0, waiting in the collective for rank 1.
    assert "no optimizer step for" in lf["message"] and "main thread, innermost first:" in lf["message"], lf
    assert "hang_if_asked" in lf["message"] or "distributed" in lf["message"], lf
    restarted = sampler.saw_restart()
    assert restarted and max(sampler.steps) <= 6, (sampler.phases, sampler.steps)
    # The second gang started from the checkpoint written before the hang (step 4). Every rank logs where it
    # resumed. The pods themselves may be gone (once the job has failed, its Job and pods are deleted), so read
    # the logs the node keeps for the job's pods (both generations: the first one does not resume).
    logs = node.pod_logs(suite_ns, f"{name}-r0-")
    assert logs, "the restarted gang never ran a pod"
    m = re.search(r"resumed from checkpoint step (\d+)", logs)
    assert m and int(m.group(1)) == 4, "the restarted gang did not resume from the step-4 checkpoint"
