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
    assert rows.splitlines() == ["| alpha | evalLoss | retainLoss |", "|---|---|---|", "| 0.5 | 1.25 | - |", "| 1 | 0.5 | 2 |"]
    pairs = any_table({"passed": True, "evalLoss": 0.75, "generations": [{"prompt": "one two", "passed": False}]})
    assert "| passed | yes |" in pairs and "| evalLoss | 0.75 |" in pairs
    assert "**generations**\n\n| prompt | passed |\n|---|---|\n| one two | no |" in pairs


def test_evaluation_and_interpolation_tables_appear_only_when_metrics_has_them(tmp_path):
    metrics = {"job": "card", "steps": 3, "evalLossBefore": 2.0, "evalLossAfter": 1.0}
    plain = render_card(config(tmp_path), metrics, [])
    assert "## Evaluation" not in plain and "WiSE-FT" not in plain
    metrics |= {"evaluation": {"evalLoss": 1.0, "perplexity": 2.718, "gate": "passed"},
                "interpolation": [{"alpha": 0.25, "evalLoss": 1.5}, {"alpha": 0.75, "evalLoss": 1.1}]}
    card = render_card(config(tmp_path), metrics, [])
    assert "## Evaluation\n|  | value |" in card and "| gate | passed |" in card
    assert "## Weight interpolation (WiSE-FT)\n| alpha | evalLoss |" in card and "| 0.75 | 1.1 |" in card


def test_write_card_draws_the_interpolation_sweep_beside_the_eval_curve(tmp_path):
    metrics = {"job": "card", "steps": 2, "lossCurve": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}],
               "evals": [{"step": 2, "evalLoss": 1.2}], "evalLossBefore": 2.5,
               "interpolation": [{"alpha": 0.5, "evalLoss": 1.4}, {"alpha": 1.0, "evalLoss": 1.2}]}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    written = write_card(tmp_path, config(tmp_path))
    assert [p.name for p in written] == ["loss.png", "eval.png", "README.md"]
    with Image.open(tmp_path / "eval.png") as img:
        assert img.format == "PNG" and img.size[0] > 800  # two panels side by side
    assert not plot_eval({"job": "card"}, tmp_path / "none.png") and not (tmp_path / "none.png").exists()
