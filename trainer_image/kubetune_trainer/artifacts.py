"""Final artifacts: adapter/, model/, metrics.json, the model card (README.md, loss.png, eval.png),
trainer-config.yaml, manifest.json, COMPLETE last."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from kubetune.api import methods
from kubetune.api.contract import (
    ADAPTER_DIR,
    CARD_FILE,
    CONFIG_FILE,
    ENV_REGISTRY_AUTH,
    EVAL_PLOT,
    GATE_FAILED_MARKER,
    LOSS_PLOT,
    MERGED_DIR,
    METRICS_FILE,
    FileEntry,
)
from kubetune.api.trainer_config import TrainerConfig

from kubetune_trainer import checkpoint as ckpt
from kubetune_trainer import gate, hub_publish, lineage, publish
from kubetune_trainer import model as model_mod
from kubetune_trainer.assess import Assessment
from kubetune_trainer.card import write_card
from kubetune_trainer.evaluation import exact_match
from kubetune_trainer.log import log
from kubetune_trainer.precision import resolve_dtype
from kubetune_trainer.setup import Parts, Runtime
from kubetune_trainer.state import RunFacts, TrainState
from kubetune_trainer.storage import cache_root
from kubetune_trainer.tracking import Tracker


@dataclass
class ArtifactWriter:
    config: TrainerConfig
    rt: Runtime
    parts: Parts
    state: TrainState
    facts: RunFacts
    started: float  # time.time() when the run began
    tracker: Tracker | None = None  # rank 0 with spec.tracking

    def save(self) -> None:
        """Every rank takes part (gathering ZeRO-3 shards); rank 0 writes and publishes."""
        acc = self.rt.accelerator
        state_dict = acc.get_state_dict(self.parts.model)
        if self.rt.is_main:
            out = Path(tempfile.mkdtemp(prefix="kubetune-artifacts-", dir=cache_root()))
            self._write_weights(out, state_dict)
            self._evaluate(out)
            self.facts.lineage = lineage.collect(self.config.spec)
            (out / METRICS_FILE).write_text(json.dumps(self.metrics(), indent=2))
            (out / CONFIG_FILE).write_text(self.config.dump_yaml())
            write_card(out, self.config)
            passed = gate.passed(self.facts.evaluation)
            if not passed:
                (out / GATE_FAILED_MARKER).write_text(
                    f"{self.facts.evaluation.summary() if self.facts.evaluation else ''}\n"
                )
            files = ckpt.file_table(out)
            ckpt.upload_files(self.rt.store, out, "", files)
            if self.config.spec.output.publish is not None:
                if passed:
                    self._publish(out, files)
                else:  # the artifacts stay in the output for inspection; the job ends EvaluationGateFailed
                    log("evaluation gate failed: nothing published")
            ckpt.seal(self.rt.store, "", files, job=self.config.job.name, step=self.state.step)
            self._finish_tracking(out, passed)
            shutil.rmtree(out, ignore_errors=True)
            log(f"artifacts -> {self.rt.store.uri} ({len(files)} files)")
        acc.wait_for_everyone()

    def _finish_tracking(self, out: Path, passed: bool) -> None:
        """After the output is sealed: the trackers get the summary, the card, the links back, and (a model
        that passed its gate) a registry version; W&B's offline run directory goes to `<uri>/wandb/`."""
        if self.tracker is None:
            return
        from kubetune.api.contract import ExitCode

        store, facts = self.rt.store, self.facts
        model_uri = store.url(pushed_dir(self.config)) + "/"
        links = {
            "kubetune.artifacts": store.uri,
            "kubetune.model": model_uri,
            "kubetune.metrics": store.url(METRICS_FILE),
        }
        if facts.oci:
            links["kubetune.oci"] = facts.oci["reference"]
        if facts.huggingface:
            links["kubetune.huggingface"] = facts.huggingface
        source = ("oci://" + facts.oci["reference"]) if facts.oci else model_uri
        card_files = [out / n for n in (CARD_FILE, LOSS_PLOT, EVAL_PLOT, METRICS_FILE)]
        code = 0 if passed else int(ExitCode.EVALUATION_GATE_FAILED)
        self.tracker.finish(out, self.metrics(), card_files, links, source if passed else None, code)
        for run_dir in self.tracker.offline_dirs:
            offline = [
                (p, f"wandb/{run_dir.name}/{p.relative_to(run_dir)}")
                for p in sorted(run_dir.rglob("*"))
                if p.is_file()
            ]
            store.put_files(offline)
            log(f"W&B offline run -> {store.url('wandb/' + run_dir.name)} (wandb sync it from there)")
            self.tracker.status = self.tracker.status.model_copy(
                update={"wandb_run": store.url("wandb/" + run_dir.name) + "/"}
            )

    def _publish(self, out: Path, files: dict[str, FileEntry]) -> None:
        """Push the model (or the adapter) as an OCI artifact, then record its digest-pinned reference in
        metrics.json: after the upload, before COMPLETE, so a failed push leaves the output unsealed."""
        spec = self.config.spec
        assert spec.output.publish is not None
        pushed = pushed_dir(self.config)
        if spec.output.publish.oci:
            parts = publish.with_card(
                publish.layers(out, files, pushed), out, files, [CARD_FILE, LOSS_PLOT, EVAL_PLOT]
            )
            annotations = lineage.oci_annotations(self.facts.lineage) if self.facts.lineage else None
            reference = publish.push(spec.output.publish, parts, registry_auth(), annotations)
            self.facts.oci = {"reference": reference, "tag": spec.output.publish.oci, "directory": pushed}
            log(f"published {pushed}/ as {reference}")
        if (hub := spec.output.publish.huggingface) is not None:
            message = f"kubetune: {self.config.job.namespace}/{self.config.job.name} step {self.state.step}"
            self.facts.huggingface = hub_publish.push(
                hub, out / pushed, [out / n for n in (CARD_FILE, LOSS_PLOT, EVAL_PLOT)], message
            )
            log(f"pushed {pushed}/ and the model card to {self.facts.huggingface}")
        (out / METRICS_FILE).write_text(json.dumps(self.metrics(), indent=2))
        files[METRICS_FILE] = ckpt.file_table(out, [METRICS_FILE])[METRICS_FILE]
        ckpt.upload_files(self.rt.store, out, "", {METRICS_FILE: files[METRICS_FILE]})

    def _write_weights(self, out: Path, state_dict: Any) -> None:
        spec, tokenizer = self.config.spec, self.parts.tokenizer
        unwrapped = self.rt.accelerator.unwrap_model(self.parts.model)
        if not methods.is_adapter(spec):
            unwrapped.save_pretrained(out / MERGED_DIR, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(out / MERGED_DIR)
            return
        unwrapped.save_pretrained(out / ADAPTER_DIR, state_dict=state_dict)
        tokenizer.save_pretrained(out / ADAPTER_DIR)
        if methods.merges_adapter(spec):
            self._merge_adapter(out)

    def _merge_adapter(self, out: Path) -> None:
        from peft import PeftModel

        spec = self.config.spec
        with model_mod.no_zero3_init():
            dtype = resolve_dtype(spec.model.dtype, torch.cuda.is_available())
            # QLoRA too: the adapter is merged into the base loaded unquantized (de-quantized weights).
            base = model_mod.load_model(self.rt.model_files.path(), dtype, spec.model.trust_remote_code)
            merged = PeftModel.from_pretrained(base, str(out / ADAPTER_DIR)).merge_and_unload()
        merged.save_pretrained(out / MERGED_DIR, safe_serialization=True)
        self.parts.tokenizer.save_pretrained(out / MERGED_DIR)
        if (q := spec.model.quantization) is not None:
            self.facts.merged_model = (
                f"de-quantized: the adapter (trained on the {q.bits}-bit {q.type if q.bits == 4 else 'int8'} base) "
                f"merged into the original {str(dtype).removeprefix('torch.')} weights"
            )
            log(f"merged model: {self.facts.merged_model}")

    def _evaluate(self, out: Path) -> None:
        """Exact match of the fine-tuned model, then spec.evaluation and the WiSE-FT mixes (assess.py)."""
        spec = self.config.spec
        samples = self.parts.gen_examples[: spec.training.eval_generation_samples]
        assessment = Assessment(self.config, self.rt, self.parts, self.state, self.facts)
        if not samples and not assessment.wanted:
            return
        tuned = self._tuned_model(out)
        if samples:
            after = self.facts.exact_match_after = exact_match(tuned, samples, self.parts.tokenizer)
            log(f"exact match after training: {after:.3f} (before {self.facts.exact_match_before or 0:.3f})")
        if assessment.wanted:
            assessment.run(out, tuned)

    def _tuned_model(self, out: Path) -> Any:
        """The fine-tuned model as saved: model/ when written, else the base with the adapter."""
        spec = self.config.spec
        if (out / MERGED_DIR).exists():
            return model_mod.plain_model(out / MERGED_DIR, spec)
        from peft import PeftModel

        with model_mod.no_zero3_init():
            return PeftModel.from_pretrained(
                model_mod.plain_model(self.rt.model_files.path(), spec), str(out / ADAPTER_DIR)
            ).eval()

    def _rewards(self) -> dict[str, Any]:
        """DPO: the last window's reward accuracy and margin, and the eval rewards before and after."""
        st = self.state
        out: dict[str, Any] = dict(self.facts.eval_rewards_before)
        if self.config.spec.objective == "dpo" and st.loss_curve:
            out.update({k: st.loss_curve[-1][k] for k in ("rewardAccuracy", "rewardMargin")})
        if st.evals:
            out.update({f"{k}After": v for k, v in st.evals[-1].items() if k.startswith("evalReward")})
        return out

    def metrics(self) -> dict[str, Any]:
        st, facts = self.state, self.facts
        optional = {"exactMatchBefore": facts.exact_match_before, "exactMatchAfter": facts.exact_match_after,
                    "mergedModel": facts.merged_model, "quantizedLayers": facts.quantized_layers,
                    "oci": facts.oci, "resumedFrom": facts.resumed, "setAside": facts.set_aside or None,
                    "huggingface": facts.huggingface, "lineage": facts.lineage or None, "tracking": self._tracking(),
                    "network": self.rt.network.model_dump(by_alias=True, mode="json", exclude_none=True) if self.rt.network else None}  # fmt: skip
        return {
            "job": self.config.job.name,
            "steps": st.step,
            "totalSteps": self.parts.total_steps,
            "worldSize": self.rt.world_size,
            "backend": self.rt.backend.name,
            "backendReason": self.rt.backend.reason,
            "lossCurve": st.loss_curve,
            "evals": st.evals,
            "evalLossBefore": facts.eval_loss_before,
            "evalLossAfter": st.evals[-1]["evalLoss"] if st.evals else None,
            "objective": self.config.spec.objective,
            **self._rewards(),
            "tokensSeen": st.tokens_seen,
            "tokensPerSecond": st.tokens_seen / st.train_seconds if st.train_seconds else None,
            "trainSeconds": st.train_seconds,
            "wallSeconds": time.time() - self.started,
            "chunkedLoss": facts.chunked_loss,
            "fastPath": facts.fast_path,
            "data": facts.data,
            "owner": facts.owner,
            "learningRate": self.config.spec.training.learning_rate,
            "usage": self._usage(),
            **{k: v for k, v in optional.items() if v is not None},
            **self._evaluation(),
        }

    def _usage(self) -> dict[str, Any]:
        """What this run's gangs used, as the trainer measures it (from each gang's start to its last
        checkpoint; status.usage, measured by the operator from the pods, also counts the rest)."""
        d = self.config.spec.distributed
        wall = self.state.active_seconds()
        return {"wallSeconds": round(wall, 1), "nodeSeconds": round(wall * d.nodes, 1), "gpuSeconds": round(wall * d.nodes * d.gpus_per_node, 1),
                "nodes": d.nodes, "gpusPerNode": d.gpus_per_node}  # fmt: skip

    def _tracking(self) -> dict[str, Any] | None:
        if self.tracker is None:
            return None
        status = self.tracker.status.model_dump(by_alias=True, exclude_none=True)
        return {**status, "delivery": self.tracker.counts()}

    def _evaluation(self) -> dict[str, Any]:
        """metrics.json's `evaluation` (the final model's figures, gate verdict, generation answers) and
        `interpolation` (one row per WiSE-FT mix), when spec.evaluation or output.interpolate asked for them."""
        facts = self.facts
        out: dict[str, Any] = {}
        if facts.evaluation is not None:
            out["evaluation"] = {
                **facts.evaluation.model_dump(by_alias=True, mode="json"),
                "generations": facts.generations,
            }
        if facts.interpolation:
            out["interpolation"] = facts.interpolation
        return out


def pushed_dir(config: TrainerConfig) -> str:
    """The directory spec.output.publish pushes (kubetune.api.methods.published_artifact)."""
    return ADAPTER_DIR if methods.published_artifact(config.spec) == "adapter" else MERGED_DIR


def registry_auth() -> Path | None:
    """The mounted dockerconfigjson (spec.output.publish.credentialsSecret), or $KUBETUNE_REGISTRY_AUTH locally."""
    path = os.environ.get(ENV_REGISTRY_AUTH)
    return Path(path) if path else None
