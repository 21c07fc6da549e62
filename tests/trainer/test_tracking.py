"""spec.tracking without a server: the bounded queue, the step floors, what is logged, the card's Hub metadata."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from kubetune.api.models import FineTuneJobSpec
from kubetune.render.trainer_config import render_trainer_config
from kubetune_trainer import tracking
from kubetune_trainer.tracking import Channel, Point, new_points, points_of, run_number, summary_points
from trainer_helpers import job_spec


class SlowSink:
    name, where = "test", "nowhere"

    def __init__(self, fail: int = 0, block: threading.Event | None = None):
        self.fail, self.block, self.got = fail, block, []

    def send(self, points: list[Point]) -> None:
        if self.block is not None:
            self.block.wait()
        if self.fail:
            self.fail -= 1
            raise ConnectionError("server went away")
        self.got += points


def test_a_tracker_that_hangs_never_slows_the_caller_and_drops_what_does_not_fit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    gate = threading.Event()
    channel = Channel(SlowSink(block=gate), capacity=100, retries=1, backoff=0)
    started = time.perf_counter()
    for step in range(5000):
        channel.put([Point("loss", 1.0, step)])
    elapsed = time.perf_counter() - started
    # a put that waited for the hung sink would not return while it hangs (the gate opens below); the bound catches
    # that, not speed (it was 1 s and failed once on a loaded CI machine)
    assert elapsed < 30.0, f"5,000 puts took {elapsed:.2f}s"
    assert channel.dropped >= 4800  # the queue holds 100; the worker holds one batch
    assert capsys.readouterr().out.count("is not taking metrics") == 1  # warned once
    gate.set()
    channel.stop(5)
    assert channel.sent + channel.dropped == 5000


def test_a_failed_send_is_retried_then_counted_and_later_points_still_go() -> None:
    sink = SlowSink(fail=2)
    channel = Channel(sink, retries=2, backoff=0)
    channel.put([Point("loss", 1.0, 1)])
    assert channel.flush(5)
    channel.put([Point("loss", 0.5, 2)])
    channel.stop(5)
    assert channel.failed == 1 and channel.sent == 1
    assert [p.step for p in sink.got] == [2]


def test_steps_the_tracker_already_holds_are_skipped_per_metric() -> None:
    floors = {"loss": 14, "evalLoss": 10}
    points = [Point("loss", 1.0, s) for s in (10, 12, 14, 16)] + [
        Point("evalLoss", 2.0, 10),
        Point("evalLoss", 1.5, 20),
    ]
    fresh = new_points(points, floors)
    assert [(p.key, p.step) for p in fresh] == [("loss", 16), ("evalLoss", 20)]
    assert new_points(points, floors) == []  # and never twice
    assert floors == {"loss": 16, "evalLoss": 20}


def test_records_become_points_without_the_step_or_non_numbers() -> None:
    record = {"step": 5, "loss": 1.25, "learningRate": 1e-3, "note": "x", "flag": True, "nan": float("nan")}
    assert points_of(record) == [Point("loss", 1.25, 5), Point("learningRate", 1e-3, 5)]


def test_the_summary_carries_before_and_after_the_final_evaluation_and_the_interpolation_table() -> None:
    metrics = {"evalLossBefore": 3.4, "evalLossAfter": 0.5, "tokensSeen": 1000, "evaluation": {"evalLoss": 0.5, "gatePassed": True},
               "interpolation": [{"alpha": 0.5, "evalLoss": 0.9}, {"alpha": 1.0, "evalLoss": 0.5}], "usage": {"gpuSeconds": 12.5}}  # fmt: skip
    got = {(p.key, p.step): p.value for p in summary_points(metrics, 30)}
    assert (
        got[("evalLossBefore", 30)] == 3.4
        and got[("final/evalLoss", 30)] == 0.5
        and got[("usage/gpuSeconds", 30)] == 12.5
    )
    assert got[("interpolation/evalLoss", 50)] == 0.9 and got[("interpolation/evalLoss", 100)] == 0.5


def test_the_run_number_comes_from_the_output_prefix() -> None:
    assert run_number("s3://b/jobs/x") == 1
    assert run_number("s3://b/jobs/x/run-3") == 3
    assert run_number("s3://b/jobs/x/run-12/") == 12


def test_hyper_parameters_are_the_resolved_spec_flattened(tmp_path: Path) -> None:
    spec = FineTuneJobSpec.model_validate(job_spec(tmp_path))
    params = tracking.hyper_parameters(render_trainer_config(spec, "j"), backend="ddp")
    assert (
        params["training.learningRate"] == "0.005" and params["lora.r"] == "8" and params["method"] == "lora"
    )
    assert (
        params["training.scheduler"] == "cosine"
    )  # defaults included: what was trained, not what was written
    assert (
        params["worldSize"] == "2" and params["backend"] == "ddp" and params["dataset.maxSeqLength"] == "32"
    )
    assert all(isinstance(v, str) and len(v) <= 500 for v in params.values())


def test_the_wandb_run_id_is_the_same_for_every_gang_of_a_run(tmp_path: Path) -> None:
    spec = FineTuneJobSpec.model_validate(job_spec(tmp_path))
    one = render_trainer_config(spec, "j", uid="1f0c-uid")
    run2 = render_trainer_config(
        spec.model_copy(update={"output": spec.output.model_copy(update={"uri": "s3://b/x/run-2"})}),
        "j",
        uid="1f0c-uid",
    )
    assert tracking.wandb_run_id(one) == tracking.wandb_run_id(one) == "1f0c-uid-1"
    assert tracking.wandb_run_id(run2) == "1f0c-uid-2"


def test_an_unreachable_mlflow_server_is_one_line_naming_the_uri_before_anything_else(tmp_path: Path) -> None:
    from kubetune.api.contract import ExitCode
    from kubetune_trainer.errors import TrainerError
    from trainer_helpers import refused_url

    with refused_url() as uri:
        spec = FineTuneJobSpec.model_validate(
            job_spec(tmp_path, **{"tracking.mlflow": {"uri": uri, "experiment": "e"}})
        )
        started = time.monotonic()
        with pytest.raises(TrainerError) as err:
            tracking.start_tracking(render_trainer_config(spec, "j"), tmp_path)
    assert err.value.exit_code == ExitCode.INFRASTRUCTURE
    assert uri in err.value.message and "\n" not in err.value.message
    assert time.monotonic() - started < 60
