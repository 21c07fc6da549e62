"""A model's config.json is read before anything is built: a missing dimension is named (transformers would fill
in its class default, a 7B-sized Llama), a non-positive or absurd one refused (exit 65) without an allocation."""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path

import pytest
from kubetune.api.contract import ExitCode
from kubetune.cli.main import main
from kubetune_trainer import model as model_mod
from kubetune_trainer.errors import TrainerError
from trainer_helpers import TINY_MODEL, job_spec


def model_with(tmp: Path, **changes: object) -> Path:
    out = tmp / "model"
    shutil.copytree(TINY_MODEL, out)
    config = json.loads((out / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"num_hidden_layers": -2}, "num_hidden_layers is -2; it must be a positive integer"),
        ({"hidden_size": 0}, "hidden_size is 0"),
        (
            {"num_hidden_layers": 1_000_000_000},
            "num_hidden_layers is 1000000000; it must be a positive integer up to 10,000",
        ),
        ({"vocab_size": 2.5}, "vocab_size is 2.5"),
        (
            {"hidden_size": None, "num_hidden_layers": None, "vocab_size": None},
            "does not state hidden_size, num_hidden_layers, vocab_size",
        ),
    ],
    ids=["negative-layers", "zero-hidden", "billion-layers", "float-vocab", "missing-fields"],
)
def test_a_nonsense_model_config_is_refused_naming_the_field(
    tmp_path: Path, changes: dict, needle: str
) -> None:
    path = model_with(tmp_path, **changes)
    with pytest.raises(TrainerError) as caught:
        model_mod.check_dimensions(path)
    assert caught.value.exit_code == ExitCode.MODEL_NOT_FOUND and needle in caught.value.message


def test_gpt2_names_count(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 30})
    )
    model_mod.check_dimensions(tmp_path)
    model_mod.check_dimensions(TINY_MODEL)


def test_preflight_refuses_a_billion_layers_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    model = model_with(tmp_path, num_hidden_layers=1_000_000_000)
    spec = job_spec(tmp_path, **{"model.source": str(model)})
    (tmp_path / "job.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "big"},
                "spec": spec,
            }
        )
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    assert main(["preflight", str(tmp_path / "job.yaml")]) == ExitCode.MODEL_NOT_FOUND
    assert time.monotonic() - started < 60
    assert (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 500_000
    )  # KiB: no 4 GB of meta modules
    err = capsys.readouterr().err
    assert "num_hidden_layers is 1000000000" in err and "activations" not in err
