"""`backend: auto`: DDP when the model and its optimizer state fit one GPU, DeepSpeed ZeRO when not.

Sizes come from config.json alone (an empty meta-device model), so real architectures are sized
here without downloading or allocating their weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from kubetune.api.models import FineTuneJobSpec
from kubetune.api.trainer_config import TrainerConfig
from kubetune.render.trainer_config import render_trainer_config
from kubetune_trainer import model as model_mod
from kubetune_trainer.backend import choose_backend, ddp_state_bytes
from kubetune_trainer.setup import pick_backend
from trainer_helpers import TINY_MODEL

GIB = 1024**3
H100 = 80 * GIB

QWEN2 = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
}
QWEN_05B = {**QWEN2, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}  # fmt: skip
QWEN_7B = {**QWEN2, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False}  # fmt: skip


def spec(method: str = "full", freeze: dict | None = None, **distributed) -> FineTuneJobSpec:
    doc: dict = {
        "model": {"source": "s3://models/m"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/job"},
        "method": method,
        "distributed": {"procsPerNode": 8, "gpusPerNode": 8, **distributed},
    }
    if freeze:
        doc["freeze"] = freeze
    return FineTuneJobSpec.model_validate(doc)


def config_dir(tmp_path: Path, config: dict) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_explicit_backend_wins() -> None:
    assert choose_backend(spec(backend="ddp"), True, lambda: (10**12, H100)).name == "ddp"
    assert choose_backend(spec(backend="deepspeed"), True, lambda: (1, H100)).name == "deepspeed"


def test_auto_on_cpu_or_one_gpu_is_ddp() -> None:
    assert choose_backend(spec(procsPerNode=2, gpusPerNode=0), False).name == "ddp"
    assert choose_backend(spec(procsPerNode=1, gpusPerNode=1), True).name == "ddp"
    assert choose_backend(spec(), False).name == "ddp"  # a GPU spec run where no GPU is: gloo, DDP


def test_auto_sizes_state_against_the_gpu() -> None:
    fits = choose_backend(spec(), True, lambda: (40 * GIB, H100))
    assert fits.name == "ddp" and "fit in 60% of 80 GiB" in fits.reason
    too_big = choose_backend(spec(zeroStage=3), True, lambda: (60 * GIB, H100))
    assert too_big.name == "deepspeed" and "ZeRO-3" in too_big.reason
    assert choose_backend(spec(offloadOptimizer=True), True, lambda: (GIB, H100)).name == "deepspeed"
    assert choose_backend(spec(), True).name == "deepspeed"  # unknown size: the safe side


def test_state_bytes_counts_every_weight_once_and_four_copies_per_trainable() -> None:
    assert ddp_state_bytes(total_params=100, trainable_params=100, weight_bytes=4, trainable_bytes=4) == 2000
    assert (
        ddp_state_bytes(total_params=100, trainable_params=10, weight_bytes=2, trainable_bytes=4)
        == 90 * 2 + 10 * 20
    )


@pytest.mark.parametrize("method", ["full", "lora"])
def test_meta_model_size_equals_the_loaded_model(method: str) -> None:
    """The empty model built from config.json has exactly the loaded model's (trainable) parameters."""
    s = spec(method)
    model = model_mod.prepare_model(s, TINY_MODEL, on_gpu=False)
    trainable, total = model_mod.trainable_parameters(model)
    expected = ddp_state_bytes(total, trainable, 4, 4)
    assert model_mod.ddp_state_bytes(s, TINY_MODEL, on_gpu=False) == expected
    if method == "lora":
        assert trainable < total / 2


def test_frozen_layers_shrink_the_state() -> None:
    full = model_mod.ddp_state_bytes(spec("full"), TINY_MODEL, on_gpu=False)
    frozen = model_mod.ddp_state_bytes(spec("full", freeze={"firstNLayers": 1}), TINY_MODEL, on_gpu=False)
    assert frozen < full


@pytest.mark.parametrize(
    ("arch", "method", "expected"),
    [
        (QWEN_05B, "full", "ddp"),
        (QWEN_05B, "lora", "ddp"),
        (QWEN_7B, "full", "deepspeed"),
        (QWEN_7B, "lora", "ddp"),
    ],
)
def test_real_architectures_on_an_80_gib_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: dict, method: str, expected: str
) -> None:
    """Qwen2.5-0.5B full (~9 GiB of state) and 7B LoRA (~15 GiB) fit DDP; 7B full (~140 GiB) needs ZeRO."""
    path = config_dir(tmp_path, arch)
    # No GPU here: the device's memory is the one thing faked, as an H100 reports it.
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=H100))
    config: TrainerConfig = render_trainer_config(spec(method), "job", "ns", "uid")
    monkeypatch.setattr(
        model_mod,
        "training_dtype",
        lambda s, on_gpu, deepspeed: torch.float32 if s.method == "full" else torch.bfloat16,
    )
    choice = pick_backend(config, True, lambda: path)
    assert choice.name == expected, choice.reason


def test_sizes_of_real_architectures(tmp_path: Path) -> None:
    small = model_mod.ddp_state_bytes(spec("full"), config_dir(tmp_path / "s", QWEN_05B), on_gpu=False)
    big = model_mod.ddp_state_bytes(spec("full"), config_dir(tmp_path / "b", QWEN_7B), on_gpu=False)
    assert 0.49e9 * 20 < small < 0.50e9 * 20  # 494 M parameters, fp32 weights + 4 fp32 copies each
    assert 7.6e9 * 20 < big < 7.7e9 * 20


def test_deepspeed_on_a_cpu_under_torchrun_never_compiles_its_unused_shared_memory_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under torchrun (no LOCAL_SIZE) DeepSpeed's shared-memory collectives initialise to nothing, yet DeepSpeed
    compiled them at every process start (a minute of CPU per pod): the op is marked unavailable, and DeepSpeed's
    own check then builds nothing and its TorchBackend uses torch.distributed. It is left to DeepSpeed only where
    it would be used (LOCAL_SIZE equal to WORLD_SIZE, as DeepSpeed's launcher sets) and can be built (ninja)."""
    import deepspeed.ops
    import torch.utils.cpp_extension as cpp
    from deepspeed.comm.torch import build_shm_op
    from kubetune_trainer.backend import skip_shm_op_unless_used

    def no_ninja() -> None:
        raise RuntimeError("Ninja is required to load C++ extensions")

    def fresh(**env: str) -> None:
        monkeypatch.setattr(deepspeed.ops, "__compatible_ops__", {"deepspeed_shm_comm": True}, raising=False)
        for key in ("WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)

    for env in ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, {"WORLD_SIZE": "3", "LOCAL_SIZE": "1"}):
        fresh(**env)  # torchrun's variables, or a gang across machines: the op would do nothing
        assert skip_shm_op_unless_used() is True, env
        assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
        assert build_shm_op() is None  # DeepSpeed's own check: no op, nothing compiled
    fresh(WORLD_SIZE="2", LOCAL_SIZE="2")  # every rank on this machine, as DeepSpeed's launcher says
    assert skip_shm_op_unless_used() is False  # ninja here: left for DeepSpeed to build and use
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is True
    fresh(WORLD_SIZE="2", LOCAL_SIZE="2")
    monkeypatch.setattr(cpp, "verify_ninja_availability", no_ninja)
    assert skip_shm_op_unless_used() is True  # no build tool: DeepSpeed would fail its process group's start
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
