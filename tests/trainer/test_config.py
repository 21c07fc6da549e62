"""The config contract: what the operator renders is what the trainer loads; the trainer's DeepSpeed config as data."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubetune.api.models import FineTuneJobSpec
from kubetune.api.trainer_config import TrainerConfig
from kubetune.render.trainer_config import render_trainer_config
from kubetune_trainer.__main__ import apply_overrides
from kubetune_trainer.backend import deepspeed_config

BASE = {
    "model": {"source": "s3://models/llama"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "output": {"uri": "s3://out/job"},
}


def _spec(**distributed) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {**BASE, "distributed": distributed, "training": {"perDeviceBatchSize": 4, "globalBatchSize": 64}}
    )


def test_operator_rendered_config_is_what_the_trainer_loads(tmp_path: Path) -> None:
    config = render_trainer_config(
        _spec(nodes=2, procsPerNode=2, gpusPerNode=2, backend="deepspeed", zeroStage=3), "job", "ns", "uid-1"
    )
    path = tmp_path / "trainer-config.yaml"
    path.write_text(config.dump_yaml())
    loaded = TrainerConfig.load(path)
    assert loaded == config
    assert loaded.world_size == 4 and loaded.gradient_accumulation_steps == 4
    assert "deepspeed" not in config.model_dump(
        by_alias=True
    )  # the trainer alone renders the DeepSpeed config


def test_quickstart_manifest_renders(tmp_path: Path) -> None:
    from kubetune.cli.run import load_manifest, localize

    manifest = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
    job = localize(load_manifest(manifest), manifest.parent, str(tmp_path), None, [], gpus=0)
    assert job.spec.model.source == "file://" + str(manifest.parent / "data" / "tiny-llama")
    assert job.spec.output.uri == "file://" + str(tmp_path)
    config = render_trainer_config(job.spec, "quickstart")
    assert TrainerConfig.model_validate(yaml.safe_load(config.dump_yaml())) == config
    assert config.world_size == 2


def test_kubetune_run_nproc_and_set_override(tmp_path: Path) -> None:
    from kubetune.cli.run import localize

    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "x"},
        "spec": {**BASE, "model": {"source": "file://m"}, "output": {"uri": "out"}},
    }
    job = localize(manifest, tmp_path, None, 3, ["training.maxSteps=7", "method=full"], gpus=0)
    assert job.spec.distributed.procs_per_node == 3 and job.spec.distributed.nodes == 1
    assert job.spec.training.max_steps == 7 and job.spec.method == "full"
    assert job.spec.model.source == f"file://{tmp_path}/m"
    assert job.spec.output.uri == f"file://{tmp_path}/out"
    assert job.spec.dataset.train == "s3://data/train.jsonl"


def test_trainer_set_overrides_spec_fields() -> None:
    doc = {"job": {"name": "j"}, "spec": {"training": {"maxSteps": 100}}, "worldSize": 1}
    apply_overrides(doc, ["training.maxSteps=5", "spec.method=full", "worldSize=2"])
    assert (
        doc["spec"]["training"]["maxSteps"] == 5 and doc["spec"]["method"] == "full" and doc["worldSize"] == 2
    )


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_config_batch_sizes_and_stage(stage: int) -> None:
    spec = _spec(nodes=2, procsPerNode=4, gpusPerNode=4, backend="deepspeed", zeroStage=stage)
    ds = deepspeed_config(spec, world_size=8, gradient_accumulation_steps=2, on_gpu=True)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["train_batch_size"] == 4 * 2 * 8
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ("stage3_gather_16bit_weights_on_model_save" in ds["zero_optimization"]) == (stage == 3)


def test_deepspeed_offload() -> None:
    spec = _spec(backend="deepspeed", zeroStage=3, offloadOptimizer=True, offloadParams=True, gpusPerNode=1)
    zero = deepspeed_config(spec, 1, 1, on_gpu=True)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"


def test_deepspeed_on_cpu_is_fp32() -> None:
    ds = deepspeed_config(_spec(backend="deepspeed"), 2, 1, on_gpu=False)
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
    assert ds["zero_optimization"]["overlap_comm"] is False
