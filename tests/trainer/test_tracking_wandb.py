"""spec.tracking.wandb in offline mode: a real run writes W&B's run directory into the artifacts, and the run
file reads back with the wandb library's own record types (no W&B server is reachable from tests)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import job_spec, run_trainer, termination

BLOCK = 32768  # the .wandb file: a LevelDB-style log of 32 KiB blocks, after a 7-byte ':W&B' header
API_KEY = "wk-3d9b2e61-never-shown"


def read_records(path: Path) -> list[Any]:
    """Every record of a .wandb run file, as wandb's protobuf Records (chunked: FULL, or FIRST..MIDDLE..LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.slow
def test_an_offline_run_is_written_into_the_artifacts_and_reads_back(tmp_path: Path) -> None:
    spec = job_spec(tmp_path, **{"training.maxSteps": 12, "training.loggingSteps": 2, "training.evalSteps": 6,
                                 "tracking.wandb": {"project": "digits", "mode": "offline"}})  # fmt: skip
    code, out = run_trainer(tmp_path, spec, nproc=2, env={"WANDB_API_KEY": API_KEY})
    assert code == 0, out[-4000:]
    output = tmp_path / "out"
    metrics = json.loads((output / "metrics.json").read_text())
    [run_file] = (output / "wandb").glob("offline-run-*/run-*.wandb")
    assert run_file.name == f"run-uid-{tmp_path.name}-1.wandb"  # the job's uid and the run number
    records = read_records(run_file)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert run.project == "digits" and "kubetune" in run.tags
    assert config["training.learningRate"] == "0.005" and config["worldSize"] == "2"
    history: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    history.setdefault(key, []).append((r.history.step.num, json.loads(item.value_json)))
    assert history["loss"] == [(p["step"], p["loss"]) for p in metrics["lossCurve"]]
    assert history["evalLoss"] == [(0, metrics["evalLossBefore"])] + [
        (e["step"], e["evalLoss"]) for e in metrics["evals"]
    ]
    assert termination(tmp_path)["progress"]["tracking"]["wandbRun"] == str(run_file.parent) + "/"
    # the API key (given as a Secret would be) is in no log and no file the job wrote
    assert API_KEY not in out
    for path in output.rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path
