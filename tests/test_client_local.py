"""The SDK's local backend: the same calls a notebook makes against a cluster, run by `kubetune run`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubetune.client import Client

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


@pytest.mark.slow
def test_local_backend_trains_reports_progress_and_downloads_the_model(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec = doc["spec"]
    spec["model"]["source"] = f"file://{DATA}/tiny-llama"
    spec["dataset"].update(
        train=f"file://{DATA}/spell-digits/train.jsonl", eval=f"file://{DATA}/spell-digits/eval.jsonl"
    )
    spec["training"].update(maxSteps=30, evalSteps=30, loggingSteps=5, evalGenerationSamples=0)
    spec["output"]["uri"] = f"file://{tmp_path}/out"

    client = Client(backend="local", workdir=tmp_path / "state")
    job = client.submit(doc)
    assert job.status is not None and job.status.phase == "Initializing"
    readings = []
    done = client.wait("quickstart", timeout=600, on_progress=readings.append)

    assert done.status is not None and done.status.phase == "Succeeded"
    assert readings, "no progress was read from rank 0 while it trained"
    steps = [p.step for p in readings if p.step is not None]
    assert steps == sorted(steps) and steps[-1] >= 20
    assert {p.total_steps for p in readings if p.step} == {30}
    got = client.artifacts("quickstart").download(tmp_path / "dl")
    assert got.path == tmp_path / "dl" / "model" and (got.path / "config.json").exists()
    assert got.verified >= 2  # weights and config checked against the output's manifest
    card = client.report("quickstart", tmp_path / "report")
    assert sorted(p.name for p in card.files) == ["README.md", "eval.png", "loss.png"] and card.verified == 3
    text = (card.path / "README.md").read_text()
    assert (
        text.startswith("---\n") and "\n---\n\n# quickstart\n" in text
    )  # the Hub's front matter, then the card
    assert [j.metadata.name for j in client.list(phase="Succeeded")] == ["quickstart"]
    assert any("step" in line for line in client.logs("quickstart", follow=False))
