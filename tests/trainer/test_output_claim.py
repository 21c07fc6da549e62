"""Owned outputs: of any number of runs that start together on one local output, exactly one gets it (the
owner record and the lock); the others are refused with a line naming the owner or the lock's holder."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubetune.api.contract import OWNER_FILE, ExitCode
from kubetune.api.models import FineTuneJobSpec, StorageSpec
from kubetune.api.trainer_config import JobRef, TrainerConfig
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.owner import OutputClaim
from kubetune_trainer.storage import OutputStore
from trainer_helpers import job_spec, launch, termination, write_config


def config_for(tmp: Path, uid: str) -> TrainerConfig:
    spec = FineTuneJobSpec.model_validate(job_spec(tmp, **{"output.uri": str(tmp / "out")}))
    return TrainerConfig(
        job=JobRef(name=uid, namespace="ml", uid=uid), spec=spec, world_size=1, gradient_accumulation_steps=1
    )


def start(tmp: str, uid: str, barrier: Any, results: Any) -> None:
    """One run's start: claim the output, then (holding it) wait until every run has tried."""
    config = config_for(Path(tmp), uid)
    claim = OutputClaim(OutputStore(config.spec.output.uri, StorageSpec()), config)
    try:
        claim.acquire(config)
        results.put((uid, os.getpid(), "trains"))
    except TrainerError as exc:
        results.put((uid, os.getpid(), f"{int(exc.exit_code)} {exc.message}"))
    barrier.wait(timeout=60)
    claim.release()


@pytest.mark.slow
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    uids=st.lists(st.sampled_from(["uid-a", "uid-b", "uid-c"]), min_size=2, max_size=4),
    owned_by=st.sampled_from([None, "uid-a"]),
)
def test_of_runs_starting_together_exactly_one_trains(
    tmp_path_factory: pytest.TempPathFactory, uids: list[str], owned_by: str | None
) -> None:
    tmp = tmp_path_factory.mktemp("claim")
    if owned_by:  # an earlier run of job a wrote the output
        (tmp / "out").mkdir()
        (tmp / "out" / OWNER_FILE).write_text(
            json.dumps({"job": "uid-a", "namespace": "ml", "uid": owned_by, "run": 1})
        )
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(len(uids)), ctx.Queue()
    procs = [ctx.Process(target=start, args=(str(tmp), uid, barrier, results)) for uid in uids]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)

    winners = [o for o in outcomes if o[2] == "trains"]
    eligible = [u for u in uids if owned_by is None or u == owned_by]
    if not eligible:
        assert winners == []
    else:
        assert len(winners) == 1, outcomes
        owner = json.loads((tmp / "out" / OWNER_FILE).read_text())
        assert owner["uid"] == winners[0][0]
    for _, _, outcome in outcomes:
        if outcome != "trains":
            assert outcome.startswith(f"{int(ExitCode.CONFIG_INVALID)} spec.output.uri: ")
            assert "is in use by" in outcome or "belongs to job ml/" in outcome, outcome


@pytest.mark.slow
def test_two_trainers_started_together_on_one_output_one_trains(tmp_path: Path) -> None:
    shared = tmp_path / "shared-out"
    runs = []
    for name in ("a", "b"):
        tmp = tmp_path / name
        tmp.mkdir()
        spec = job_spec(
            tmp, **{"output.uri": str(shared), "training.maxSteps": 6, "distributed.procsPerNode": 1}
        )
        runs.append((tmp, launch(tmp, write_config(tmp, spec), 1, start_new_session=True)))
    codes = {}
    for tmp, proc in runs:
        out, _ = proc.communicate(timeout=900)
        codes[tmp.name] = (proc.returncode, out)
    trained = [name for name, (code, _) in codes.items() if code == 0]
    assert len(trained) == 1, {k: (c, o[-1500:]) for k, (c, o) in codes.items()}
    loser = "b" if trained == ["a"] else "a"
    assert codes[loser][0] == ExitCode.CONFIG_INVALID
    message = termination(tmp_path / loser)["message"]
    assert "belongs to job" in message or "in use by" in message
    metrics = json.loads((shared / "metrics.json").read_text())
    assert metrics["owner"]["uid"] == f"uid-{trained[0]}"
