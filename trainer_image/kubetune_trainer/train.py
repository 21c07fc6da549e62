"""The recipe: setup -> train -> save -> cleanup. One Trainer per process; rank 0 also reports progress.

Each step is a short method over small parts: setup.py (accelerator, model, data, optimizer),
loop.py (the step loop), checkpoint.py, evaluation.py, artifacts.py; debug.py is the test seam.
"""

from __future__ import annotations

import time
from http.server import ThreadingHTTPServer

import torch
from kubetune.api.contract import COMPLETE_MARKER, GATE_FAILED_MARKER, ExitCode, TrainerPhase
from kubetune.api.models import Artifacts
from kubetune.api.trainer_config import TrainerConfig

from kubetune_trainer import gate, hub_publish, publish, signals, tracking
from kubetune_trainer.artifacts import ArtifactWriter, registry_auth
from kubetune_trainer.checkpoint import Checkpointer, set_aside_earlier
from kubetune_trainer.debug import DebugHooks
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.evaluation import Evaluator
from kubetune_trainer.gate import GateFailed
from kubetune_trainer.log import log
from kubetune_trainer.loop import Outcome, StepLoop, StopFlag
from kubetune_trainer.owner import OutputClaim
from kubetune_trainer.progress import ProgressState, serve
from kubetune_trainer.setup import Parts, Runtime, build_parts, start_runtime
from kubetune_trainer.state import RunFacts, TrainState
from kubetune_trainer.storage import OutputStore, cache_root


class Trainer:
    def __init__(self, config: TrainerConfig):
        self.config = config
        self.spec = config.spec
        self.started = time.time()
        self.state = TrainState()
        self.facts = RunFacts()
        self.progress = ProgressState()
        self.stop = StopFlag()
        self.hooks = DebugHooks.from_env()
        self.server: ThreadingHTTPServer | None = None
        self.done = False  # the output already holds complete artifacts: nothing to do
        self._runtime: Runtime | None = None
        self._parts: Parts | None = None
        self._evaluator: Evaluator | None = None
        self._checkpointer: Checkpointer | None = None
        self._claim: OutputClaim | None = None
        self.tracker: tracking.Tracker | None = None  # rank 0, with spec.tracking

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None, "setup() first"
        return self._runtime

    @property
    def parts(self) -> Parts:
        assert self._parts is not None, "setup() first"
        return self._parts

    def setup(self) -> None:
        from accelerate.utils import set_seed

        rt = self._runtime = start_runtime(self.config)
        self.progress.update(network=rt.network)  # status.network: the check before step 0
        signals.stop_at_next_step(self.stop.set)  # SIGTERM, SIGINT and SIGHUP: checkpoint at the next step
        if rt.is_main:
            self._serve_and_claim(rt)
        set_seed(self.spec.training.seed)
        self.done = rt.store.exists(COMPLETE_MARKER)
        if rt.is_main and not self.done:  # an unreachable tracker or refused credentials fail before training
            self.tracker = tracking.start_tracking(self.config, cache_root() / "tracking", rt.backend.name)
            if self.tracker is not None:
                self.progress.update(tracking=self.tracker.status)
        if self.done:
            self._already_done(rt)
            return
        parts = self._parts = build_parts(self.config, rt, self.facts, self.progress)
        self._checkpointer = Checkpointer(rt.accelerator, rt.store, self.config.job.uid or self.config.job.name,
                                          rt.world_size, self.spec.output.keep_checkpoints, self.spec)  # fmt: skip
        if parts.eval_loader is not None:
            self._evaluator = Evaluator(
                rt.accelerator, parts.model, parts.eval_loader, self.progress, self.spec, parts.reference
            )
        self._resume_or_measure()
        self.progress.update(total_steps=parts.total_steps, step=self.state.step, phase=TrainerPhase.TRAINING)

    def _serve_and_claim(self, rt: Runtime) -> None:
        """Rank 0, before training: serve progress, claim the output (the run's first write: a second owner's run is
        refused here) and check the publishing credentials, so wrong ones fail before any step."""
        self.server = serve(self.progress, self.config.progress_port)
        log(
            f"progress on :{self.server.server_address[1]}/progress; world size {rt.world_size}; {rt.accelerator.distributed_type}"
        )
        log(f"backend {rt.backend.name}: {rt.backend.reason}")
        self._claim = OutputClaim(rt.store, self.config)
        self.facts.owner = self._claim.acquire(self.config)
        if (publish_spec := self.spec.output.publish) is not None and publish_spec.oci:
            publish.check_access(publish_spec, registry_auth())
        if publish_spec is not None and publish_spec.huggingface is not None:
            hub_publish.check_access(publish_spec.huggingface)

    def _already_done(self, rt: Runtime) -> None:
        """The output holds complete artifacts: nothing to train, unless they failed their gate (which stays failed)."""
        if rt.store.exists(GATE_FAILED_MARKER):
            raise TrainerError(ExitCode.EVALUATION_GATE_FAILED, f"{rt.store.uri} already holds a model that failed its "
                               "evaluation gate (see metrics.json evaluation); change the spec or delete the output to train again")  # fmt: skip
        if rt.is_main:
            log(f"{rt.store.uri} already holds complete artifacts; nothing to do")

    def _resume_or_measure(self) -> None:
        """Continue from the newest verified checkpoint (this run's, else resumeFrom's); a fresh run measures
        the eval loss before training, and the checkpoints keep it for every resume."""
        previous = (
            OutputStore(self.config.resume_from, self.spec.storage) if self.config.resume_from else None
        )
        assert self._checkpointer is not None
        resumed = self._checkpointer.resume(self.spec, previous, self.parts.optimizer, self.parts.scheduler)
        self.facts.set_aside = (
            resumed.set_aside if resumed is not None else set_aside_earlier(self.runtime.store, [])
        )
        if self.facts.set_aside:
            self.progress.update(checkpoint_warning=set_aside_warning(self.facts.set_aside))
        if resumed is not None:
            self.state = resumed.state
            self.facts.resumed = {
                "checkpoint": resumed.checkpoint,
                "step": resumed.state.step,
                "configChanges": resumed.changes,
            }
            self.facts.eval_loss_before = self.state.before.get("evalLoss")
            self.facts.eval_rewards_before = dict(self.state.before.get("rewards") or {})
        if self._evaluator is None or self.state.step != 0:
            return
        self.facts.eval_loss_before = self._evaluator.loss()
        self.facts.eval_rewards_before = {f"{k}Before": v for k, v in self._evaluator.rewards.items()}
        self.state.before = {
            "evalLoss": self.facts.eval_loss_before,
            "rewards": self.facts.eval_rewards_before,
        }
        if self.runtime.is_main:
            log(f"eval loss before training: {self.facts.eval_loss_before:.4f}")

    def train(self) -> ExitCode:
        assert self._checkpointer is not None
        st = self.state
        loop = StepLoop(
            self.spec,
            self.runtime,
            self.parts,
            st,
            self.progress,
            self.stop,
            self.hooks,
            self._evaluator,
            self._checkpointer,
            self.tracker,
        )
        if self.tracker is not None:
            self.tracker.observe(st, self.facts.eval_loss_before)
        if loop.run() is Outcome.PREEMPTED:
            log(f"{self.stop.reason()}: checkpoint written at step {st.step}; exiting for a restart")
            return ExitCode.PREEMPTED
        if self._evaluator is not None and (not st.evals or st.evals[-1]["step"] != st.step):
            self._evaluator.evaluate_and_check(st)
        if self.tracker is not None:
            self.tracker.observe(st)
        zero3 = self.runtime.backend.deepspeed and self.spec.distributed.zero_stage == 3
        self.hooks.dump_rank_state(
            self.runtime.accelerator, self.parts.model, self.runtime.world_size, zero3, st.loss_curve
        )
        return ExitCode.OK

    def save(self) -> None:
        """Artifacts (with the evaluation and its gate) to the output, then: a failed gate ends the run
        (GateFailed, not retryable) before anything is published; the artifacts stay for inspection."""
        self.progress.update(phase=TrainerPhase.SAVING)
        ArtifactWriter(
            self.config, self.runtime, self.parts, self.state, self.facts, self.started, self.tracker
        ).save()
        if self.tracker is not None:
            self.progress.update(tracking=self.tracker.status)
        if not self.gate_passed():
            raise GateFailed(self.facts.evaluation, self.runtime.store.uri)  # type: ignore[arg-type]
        self.progress.update(phase=TrainerPhase.SUCCEEDED)

    def published(self) -> Artifacts | None:
        """What the termination message carries beyond the fixed layout: the pushed OCI reference and Hub commit."""
        oci = self.facts.oci["reference"] if self.facts.oci else None
        return (
            Artifacts(oci=oci, huggingface=self.facts.huggingface) if oci or self.facts.huggingface else None
        )

    def gate_passed(self) -> bool:
        """Whether the final model may be published: no gate, or every threshold met (rank 0 knows; other
        ranks say True, they publish nothing)."""
        return gate.passed(self.facts.evaluation)

    def stop_reason(self) -> str:
        return self.stop.reason()

    def end_tracking(self, exit_code: int | None) -> None:
        """Flush what is queued for the trackers (bounded); a final exit code closes the runs, None (a
        preemption or an infrastructure error: the next gang continues) leaves them open."""
        if self.tracker is not None:
            self.tracker.close(exit_code)

    def cleanup(self) -> None:
        self.end_tracking(None)
        if self._claim is not None:
            self._claim.release()
        if self.server is not None:
            self.server.shutdown()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def set_aside_warning(set_aside: list[dict[str, str]]) -> str:
    """One line for status.progress (and the termination message): which checkpoints failed verification."""
    first = set_aside[-1]
    more = f" (and {len(set_aside) - 1} more)" if len(set_aside) > 1 else ""
    return f"checkpoint {first['checkpoint']} failed verification ({first['problem']}); set aside as {first['setAsideAs']}{more}"[
        :500
    ]
