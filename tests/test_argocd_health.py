"""The Argo CD health check (Lua) maps FineTuneJob phases to Argo CD health, run with lupa."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

lupa = pytest.importorskip("lupa", reason="pip install lupa to run the Argo CD health check")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = (ROOT / "deploy" / "argocd" / "health-finetunejob.lua").read_text()


def health(status: dict | None) -> dict:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    obj = {"kind": "FineTuneJob"} if status is None else {"kind": "FineTuneJob", "status": status}
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(SCRIPT)
    return dict(result.items())


@pytest.mark.parametrize("phase", ["Pending", "Initializing", "Running", "Restarting"])
def test_active_phases_are_progressing(phase):
    assert health({"phase": phase})["status"] == "Progressing"


def test_succeeded_is_healthy():
    assert health({"phase": "Succeeded"})["status"] == "Healthy"


def test_failed_is_degraded_with_the_message():
    h = health({"phase": "Failed", "message": "spec.training.evalSteps: needs evaluation data"})
    assert h["status"] == "Degraded"
    assert h["message"] == "Failed: spec.training.evalSteps: needs evaluation data"


def test_suspended_is_suspended():
    assert health({"phase": "Suspended"})["status"] == "Suspended"


def test_no_status_yet_is_progressing():
    assert health(None)["status"] == "Progressing"


def test_argocd_cm_patch_carries_the_same_script():
    patch = yaml.safe_load((ROOT / "deploy" / "argocd" / "argocd-cm-patch.yaml").read_text())
    assert patch["data"]["resource.customizations.health.kubetune.io_FineTuneJob"] == SCRIPT


def test_a_finished_job_edited_but_not_yet_acted_on_is_progressing():
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    obj = {
        "kind": "FineTuneJob",
        "metadata": {"generation": 3},
        "status": {"phase": "Succeeded", "observedGeneration": 2},
    }
    lua.globals().obj = lua.table_from(obj, recursive=True)
    h = dict(lua.execute(SCRIPT).items())
    assert h["status"] == "Progressing" and "generation 3" in h["message"]


def test_a_new_run_after_an_edit_is_progressing():
    assert (
        health({"phase": "Pending", "run": 2, "runs": [{"run": 1, "outcome": "Succeeded"}]})["status"]
        == "Progressing"
    )
