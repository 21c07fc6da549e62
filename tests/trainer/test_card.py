"""The model card's tables and plots, from metrics.json sections of any shape (no training here: the card
from a real run is checked in test_lifecycle.py)."""

from __future__ import annotations

import json
from pathlib import Path

from kubetune.api.models import FineTuneJobSpec
from kubetune.render.trainer_config import render_trainer_config
from kubetune_trainer.card import any_table, plot_eval, render_card, write_card
from PIL import Image
from trainer_helpers import job_spec


def config(tmp: Path):
    return render_trainer_config(FineTuneJobSpec.model_validate(job_spec(tmp)), name="card", uid="u")


def test_records_become_rows_and_mappings_become_name_value_pairs():
    rows = any_table([{"alpha": 0.5, "evalLoss": 1.25}, {"alpha": 1.0, "evalLoss": 0.5, "retainLoss": 2.0}])
    assert rows.splitlines() == [
        "| alpha | evalLoss | retainLoss |",
        "|---|---|---|",
        "| 0.5 | 1.25 | - |",
        "| 1 | 0.5 | 2 |",
    ]
    pairs = any_table(
        {"passed": True, "evalLoss": 0.75, "generations": [{"prompt": "one two", "passed": False}]}
    )
    assert "| passed | yes |" in pairs and "| evalLoss | 0.75 |" in pairs
    assert "**generations**\n\n| prompt | passed |\n|---|---|\n| one two | no |" in pairs


def test_evaluation_and_interpolation_tables_appear_only_when_metrics_has_them(tmp_path):
    metrics = {"job": "card", "steps": 3, "evalLossBefore": 2.0, "evalLossAfter": 1.0}
    plain = render_card(config(tmp_path), metrics, [])
    assert "## Evaluation" not in plain and "WiSE-FT" not in plain
    metrics |= {
        "evaluation": {"evalLoss": 1.0, "perplexity": 2.718, "gate": "passed"},
        "interpolation": [{"alpha": 0.25, "evalLoss": 1.5}, {"alpha": 0.75, "evalLoss": 1.1}],
    }
    card = render_card(config(tmp_path), metrics, [])
    assert "## Evaluation\n|  | value |" in card and "| gate | passed |" in card
    assert "## Weight interpolation (WiSE-FT)\n| alpha | evalLoss |" in card and "| 0.75 | 1.1 |" in card


def test_write_card_draws_the_interpolation_sweep_beside_the_eval_curve(tmp_path):
    metrics = {
        "job": "card",
        "steps": 2,
        "lossCurve": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}],
        "evals": [{"step": 2, "evalLoss": 1.2}],
        "evalLossBefore": 2.5,
        "interpolation": [{"alpha": 0.5, "evalLoss": 1.4}, {"alpha": 1.0, "evalLoss": 1.2}],
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    written = write_card(tmp_path, config(tmp_path))
    assert [p.name for p in written] == ["loss.png", "eval.png", "README.md"]
    with Image.open(tmp_path / "eval.png") as img:
        assert img.format == "PNG" and img.size[0] > 800  # two panels side by side
    assert not plot_eval({"job": "card"}, tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def hub_config(tmp: Path, **overrides):
    spec = job_spec(tmp, **{"model.source": "hf://acme/tiny-llama", "model.revision": "main",
                            "dataset.train": "hf://acme/spell-digits", **overrides})  # fmt: skip
    return render_trainer_config(FineTuneJobSpec.model_validate(spec), name="card", uid="u")


def test_the_card_has_hub_front_matter_that_huggingface_hub_reads_back(tmp_path):
    from huggingface_hub import ModelCard

    cfg = hub_config(
        tmp_path, **{"output.card": {"license": "apache-2.0", "tags": ["digits"], "language": ["en"]}}
    )
    path = tmp_path / "README.md"
    path.write_text(render_card(cfg, {"job": "card", "steps": 3}, []))
    card = ModelCard.load(path)  # huggingface_hub parses the YAML front matter as the Hub does
    data = card.data.to_dict()
    assert data["base_model"] == "acme/tiny-llama" and data["datasets"] == ["acme/spell-digits"]
    assert data["library_name"] == "transformers"  # lora with a merged model: the merged weights
    assert (
        data["pipeline_tag"] == "text-generation"
        and data["license"] == "apache-2.0"
        and data["language"] == ["en"]
    )
    assert data["tags"][:1] == ["kubetune"] and {"lora", "sft", "digits"} <= set(data["tags"])
    assert card.text.lstrip().startswith("# card")  # the Markdown body after the metadata


def test_an_adapter_alone_is_a_peft_card_without_hub_ids_for_other_sources(tmp_path):
    from huggingface_hub import ModelCard

    cfg = render_trainer_config(
        FineTuneJobSpec.model_validate(job_spec(tmp_path, **{"output.mergeAdapter": False})), name="card"
    )
    path = tmp_path / "README.md"
    path.write_text(render_card(cfg, {"job": "card", "steps": 3}, []))
    data = ModelCard.load(path).data.to_dict()
    assert data["library_name"] == "peft" and "peft" in data["tags"]
    assert (
        "base_model" not in data and "datasets" not in data and "license" not in data
    )  # a local path is no Hub id


def test_tracking_usage_and_lineage_sections_come_from_metrics(tmp_path):
    metrics = {"job": "card", "steps": 3, "tracking": {"mlflowRun": "http://mlflow/#/experiments/1/runs/abc"},
               "usage": {"wallSeconds": 60.0, "gpuSeconds": 480.0},
               "lineage": {"baseModel": {"source": "hf://acme/tiny-llama", "identity": "commit:" + "c" * 40},
                           "datasets": [{"uri": "s3://d/train.jsonl", "identity": "etag:e1", "files": {"train.jsonl": "ab" * 32}}],
                           "kubetuneVersion": "0.1.0", "trainerImage": "r/t@sha256:" + "e" * 64, "trainerImageDigest": "sha256:" + "e" * 64}}  # fmt: skip
    card = render_card(config(tmp_path), metrics, [])
    assert "- MLflow run: http://mlflow/#/experiments/1/runs/abc" in card
    assert "| gpuSeconds | 480 |" in card
    assert (
        f"| base model as fetched | `commit:{'c' * 40}` |" in card
        and "| data s3://d/train.jsonl as fetched | `etag:e1` |" in card
        and f"| data s3://d/train.jsonl train.jsonl | sha256:{'ab' * 32} |" in card
    )
    assert f"| trainer image | sha256:{'e' * 64} |" in card
