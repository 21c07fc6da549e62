"""The model card: README.md beside the weights, and loss.png / eval.png, all drawn from metrics.json.

`write_card(out, config)` reads `out/metrics.json` and writes the three files next to it, so anything
that adds to metrics.json later (an evaluation, an interpolation sweep) calls it again. The Markdown
is a pure function of the spec and the metrics (`render_card`); the plots use matplotlib's Agg
backend (no display).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kubetune.api import methods
from kubetune.api.contract import ADAPTER_DIR, CARD_FILE, EVAL_PLOT, LOSS_PLOT, MERGED_DIR, METRICS_FILE
from kubetune.api.models import FineTuneJobSpec
from kubetune.api.trainer_config import TrainerConfig

SECTIONS_FROM_METRICS = (("evaluation", "Evaluation"), ("interpolation", "Weight interpolation (WiSE-FT)"))
"""Tables copied from metrics.json when present: (key, heading)."""


# ------------------------------------------------------------------ tables


def fmt(value: Any) -> str:
    """A cell: numbers to 4 significant digits, nested values as compact JSON, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(", ", ": "))
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def any_table(data: Any) -> str:
    """A table for whatever shape a metrics.json section has: a list of records (one row each), a
    mapping of records (one row per key), or a mapping of values (name | value)."""
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        cols = list(dict.fromkeys(k for r in data for k in r))
        return table(cols, [[r.get(c) for c in cols] for r in data])
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        cols = list(dict.fromkeys(k for v in data.values() for k in v))
        return table(["", *cols], [[k, *(v.get(c) for c in cols)] for k, v in data.items()])
    if isinstance(data, dict):  # scalars as name | value; lists of records as their own tables below
        nested = {
            k: v for k, v in data.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)
        }
        out = table(["", "value"], [[k, v] for k, v in data.items() if k not in nested])
        return "\n\n".join([out, *(f"**{k}**\n\n{any_table(v)}" for k, v in nested.items())])
    return fmt(data)


# ------------------------------------------------------------------ the card


def _method_line(spec: FineTuneJobSpec) -> str:
    line: str = spec.method
    if spec.method in ("lora", "dora"):
        lora = spec.lora
        r, alpha, targets = (lora.r, lora.alpha, lora.target_modules) if lora else (16, 32.0, ["all-linear"])
        line += f" (r={r}, alpha={alpha:g}, target modules: {', '.join(targets)})"
    if spec.model.quantization is not None:
        line += f", base quantized to {spec.model.quantization.bits} bits (QLoRA)"
    return line + f"; objective {spec.objective}"


def _data_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    data = metrics.get("data") or {}
    rows = [["train", s.get("path"), s.get("format"), s.get("examples"), s.get("tokens"), s.get("truncated"), s.get("dropped")]
            for s in data.get("sources") or []]  # fmt: skip
    if ev := data.get("eval"):
        rows.append(
            [
                "eval",
                ev.get("path"),
                ev.get("format"),
                ev.get("examples"),
                ev.get("tokens"),
                ev.get("truncated"),
                ev.get("dropped"),
            ]
        )
    return rows


def _hyper_rows(spec: FineTuneJobSpec, metrics: dict[str, Any]) -> list[list[Any]]:
    t, d = spec.training, spec.distributed
    length = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epochs"
    warmup = f"{t.warmup_steps} steps" if t.warmup_steps is not None else f"{t.warmup_ratio:g} of the steps"
    return [
        ["length", f"{length} ({metrics.get('steps')} done)"],
        ["learning rate", f"{t.learning_rate:g}, {t.scheduler}, warmup {warmup}"],
        [
            "batch",
            f"{t.per_device_batch_size} per process, {t.global_batch_size or 'no accumulation'} global",
        ],
        ["max sequence length", spec.dataset.max_seq_length],
        ["precision", t.precision],
        ["weight decay / grad clip", f"{t.weight_decay:g} / {t.max_grad_norm:g}"],
        ["seed", t.seed],
        [
            "processes",
            f"{metrics.get('worldSize')} ({d.nodes} node(s) x {d.procs_per_node}), backend {metrics.get('backend')}",
        ],
    ]


def _result_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    before, after = metrics.get("evalLossBefore"), metrics.get("evalLossAfter")
    rows: list[list[Any]] = []
    if before is not None or after is not None:
        rows.append(["eval loss", before, after])
        rows.append(
            ["eval perplexity", *(math.exp(v) if v is not None and v < 50 else None for v in (before, after))]
        )
    if "exactMatchBefore" in metrics or "exactMatchAfter" in metrics:
        rows.append(["exact match", metrics.get("exactMatchBefore"), metrics.get("exactMatchAfter")])
    for key in sorted(metrics):
        if key.startswith("evalReward") and key.endswith("Before") and (key[:-6] + "After") in metrics:
            rows.append([key[:-6], metrics[key], metrics[key[:-6] + "After"]])
    return rows


def _provenance_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    """The output's owner, the checkpoint resumed and any set aside (the inputs trained on: the Lineage section)."""
    rows: list[list[Any]] = []
    if owner := metrics.get("owner"):
        rows.append(
            [
                "output owner",
                f"{owner.get('namespace')}/{owner.get('job')} (uid {owner.get('uid')}, run {owner.get('run')}, {owner.get('runId')})",
            ]
        )
    if resumed := metrics.get("resumedFrom"):
        changes = "; ".join(resumed.get("configChanges") or []) or "same config"
        rows.append(["resumed from", f"{resumed.get('checkpoint')} ({changes})"])
    for aside in metrics.get("setAside") or []:
        rows.append(
            [
                "set aside",
                f"{aside.get('checkpoint')}: {aside.get('problem')} (kept as {aside.get('setAsideAs')})",
            ]
        )
    return rows


def _artifacts(spec: FineTuneJobSpec) -> str:
    lines = []
    if methods.writes_full_model(spec):
        lines.append(f"- `{MERGED_DIR}/`: full weights (safetensors) and tokenizer: "
                     f'`AutoModelForCausalLM.from_pretrained("{MERGED_DIR}")`')  # fmt: skip
    if methods.is_adapter(spec):
        lines.append(
            f'- `{ADAPTER_DIR}/`: the {spec.method} adapter: `PeftModel.from_pretrained(base, "{ADAPTER_DIR}")`'
        )
    lines.append(f"- `{METRICS_FILE}`: every figure on this card; `manifest.json`: each file's sha256")
    return "\n".join(lines)


def hub_id(uri: str | None) -> str | None:
    """`hf://org/name` -> `org/name` (a Hub repository id); None for any other source."""
    if not uri or not uri.startswith("hf://"):
        return None
    return "/".join(uri.removeprefix("hf://").split("/")[:2]) or None


def library_name(spec: FineTuneJobSpec) -> str:
    """`peft` when what is published (or, unpublished, all that is written) is an adapter; else `transformers`."""
    published = methods.published_artifact(spec)
    if published is not None:
        return "peft" if published == "adapter" else "transformers"
    return "transformers" if methods.writes_full_model(spec) else "peft"


def front_matter(config: TrainerConfig) -> Any:
    """The card's Hub metadata (huggingface_hub's ModelCardData): base_model, library_name, pipeline_tag,
    tags (kubetune, the method, the objective and spec.output.card.tags), datasets, license, language."""
    from huggingface_hub import ModelCardData

    spec, card = config.spec, config.spec.output.card
    datasets = [d for d in dict.fromkeys(hub_id(s.path) for s in spec.dataset.train_sources()) if d]
    tags = list(dict.fromkeys(["kubetune", spec.method.replace("_", "-"), spec.objective, *card.tags]))
    if library_name(spec) == "peft":
        tags.insert(1, "peft")
    data = ModelCardData(
        model_name=config.job.name,
        base_model=hub_id(spec.model.source),
        library_name=library_name(spec),
        pipeline_tag="text-generation",
        tags=tags,
        datasets=datasets or None,
        license=card.license,
        language=card.language or None,
    )
    return data


def _lineage_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    lineage = metrics.get("lineage") or {}
    base = lineage.get("baseModel") or {}
    rows: list[list[Any]] = [["base model", base.get("source")]]
    if base.get("identity"):
        rows.append(["base model as fetched", f"`{base['identity']}`"])
    if base.get("sha256"):
        rows.append(["base model sha256 (config and weights)", base["sha256"]])
    for d in lineage.get("datasets") or []:
        if d.get("identity"):
            rows.append([f"data {d.get('uri')} as fetched", f"`{d['identity']}`"])
        for name, digest in sorted((d.get("files") or {}).items()):
            rows.append([f"data {d.get('uri')} {name}", f"sha256:{digest}"])
    rows.append(["kubetune", lineage.get("kubetuneVersion")])
    if lineage.get("trainerImage"):
        rows.append(["trainer image", lineage.get("trainerImageDigest") or lineage["trainerImage"]])
    return rows


def _usage_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    usage = metrics.get("usage") or {}
    return [[k, v] for k, v in usage.items()]


def _tracking_lines(metrics: dict[str, Any]) -> list[str]:
    tracking = metrics.get("tracking") or {}
    lines = []
    if tracking.get("mlflowRun"):
        lines.append(f"- MLflow run: {tracking['mlflowRun']}")
    if tracking.get("wandbRun"):
        lines.append(f"- Weights & Biases run: {tracking['wandbRun']}")
    return lines


def render_card(config: TrainerConfig, metrics: dict[str, Any], plots: list[str]) -> str:
    """README.md for the artifacts: the Hub's YAML front matter, then base model, data, method,
    hyper-parameters, results, plots, the evaluation and interpolation tables when metrics.json has
    them, the runs in the experiment trackers, the compute used and the lineage."""
    return f"---\n{front_matter(config).to_yaml()}\n---\n\n" + render_body(config, metrics, plots)


def render_body(config: TrainerConfig, metrics: dict[str, Any], plots: list[str]) -> str:
    spec, job = config.spec, config.job.name
    rev = f" (revision {spec.model.revision})" if spec.model.revision else ""
    parts = [
        f"# {job}",
        f"Fine-tuned from `{spec.model.source}`{rev} by kubetune: {_method_line(spec)}.",
        "## Base model and method\n"
        + table(
            ["", "value"],
            [
                ["base model", spec.model.source + rev],
                ["method", _method_line(spec)],
                ["dtype", spec.model.dtype],
            ],
        ),  # fmt: skip
        "## Data\n"
        + table(
            ["split", "path", "format", "examples", "tokens", "truncated", "dropped"], _data_rows(metrics)
        ),
        "## Hyper-parameters\n" + table(["", "value"], _hyper_rows(spec, metrics)),
        _results_section(metrics),
    ]
    if plots:
        parts.append("\n".join(f"![{Path(p).stem}]({p})" for p in plots))
    parts += _sections_from_metrics(metrics)
    parts.append("## Files\n" + _artifacts(spec))
    return "\n\n".join(parts) + "\n"


def _results_section(metrics: dict[str, Any]) -> str:
    """The metrics before and after training (when there are any), then the throughput."""
    results = _result_rows(metrics)
    speed = [["tokens seen", metrics.get("tokensSeen")], ["tokens/s", metrics.get("tokensPerSecond")],
             ["training time (s)", metrics.get("trainSeconds")]]  # fmt: skip
    return (
        "## Results\n"
        + (table(["metric", "before", "after"], results) + "\n\n" if results else "")
        + table(["throughput", "value"], speed)
    )


def _sections_from_metrics(metrics: dict[str, Any]) -> list[str]:
    """The sections metrics.json has something for: evaluation, interpolation, provenance, tracking, usage, lineage."""
    sections = [
        f"## {heading}\n" + any_table(metrics[key])
        for key, heading in SECTIONS_FROM_METRICS
        if metrics.get(key)
    ]
    if provenance := _provenance_rows(metrics):
        sections.append("## Provenance\n" + table(["", "value"], provenance))
    if tracked := _tracking_lines(metrics):
        sections.append("## Experiment tracking\n" + "\n".join(tracked))
    if metrics.get("usage"):
        sections.append("## Compute used\n" + table(["", "value"], _usage_rows(metrics)))
    if metrics.get("lineage"):
        sections.append("## Lineage\n" + table(["", "value"], _lineage_rows(metrics)))
    return sections


# ------------------------------------------------------------------ plots


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display in a pod
    from matplotlib import pyplot as plt

    return plt


def plot_loss(metrics: dict[str, Any], path: Path) -> bool:
    """Training loss (and eval loss) by step; False when there is no curve to draw."""
    curve = [p for p in metrics.get("lossCurve") or [] if p.get("loss") is not None]
    if not curve:
        return False
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], label="train loss")
    evals = [e for e in metrics.get("evals") or [] if e.get("evalLoss") is not None]
    if evals:
        ax.plot([e["step"] for e in evals], [e["evalLoss"] for e in evals], "o-", label="eval loss")
    ax.set(xlabel="step", ylabel="loss", title=f"{metrics.get('job', '')}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return True


def _interpolation_points(metrics: dict[str, Any]) -> list[tuple[float, float]]:
    """(mix, eval loss) pairs from an interpolation table, whatever its key names for them."""
    rows = metrics.get("interpolation")
    if isinstance(rows, dict):
        rows = rows.get("rows") or rows.get("table")
    points = []
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, dict):
            continue
        mix = next(
            (row[k] for k in ("alpha", "mix", "weight", "ratio") if isinstance(row.get(k), int | float)), None
        )
        loss = next(
            (row[k] for k in ("evalLoss", "eval_loss", "loss") if isinstance(row.get(k), int | float)), None
        )
        if mix is not None and loss is not None:
            points.append((float(mix), float(loss)))
    return sorted(points)


def plot_eval(metrics: dict[str, Any], path: Path) -> bool:
    """Eval loss by step from before training (step 0) to the end, and the interpolation sweep if any."""
    evals = [(e["step"], e["evalLoss"]) for e in metrics.get("evals") or [] if e.get("evalLoss") is not None]
    if metrics.get("evalLossBefore") is not None:
        evals = [(0, metrics["evalLossBefore"]), *evals]
    sweep = _interpolation_points(metrics)
    if not evals and not sweep:
        return False
    plt = _figure()
    fig, axes = plt.subplots(
        1, 2 if evals and sweep else 1, figsize=(9 if evals and sweep else 6, 3.5), dpi=100, squeeze=False
    )
    panels = list(axes[0])
    if evals:
        ax = panels.pop(0)
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-")
        ax.set(xlabel="step", ylabel="eval loss", title="held-out loss")
        ax.grid(alpha=0.3)
    if sweep:
        ax = panels.pop(0)
        ax.plot([m for m, _ in sweep], [v for _, v in sweep], "s-")
        ax.set(xlabel="fine-tuned weight share", ylabel="eval loss", title="weight interpolation")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return True


def write_card(out: Path, config: TrainerConfig) -> list[Path]:
    """README.md, loss.png and eval.png in `out`, from `out/metrics.json`; the files written."""
    metrics = json.loads((out / METRICS_FILE).read_text())
    written = [
        out / name
        for name, draw in ((LOSS_PLOT, plot_loss), (EVAL_PLOT, plot_eval))
        if draw(metrics, out / name)
    ]
    (out / CARD_FILE).write_text(render_card(config, metrics, [p.name for p in written]))
    return [*written, out / CARD_FILE]
