"""Short real runs through the trainer's entry point, so every code path of the fast path runs once on this device:
LoRA and full fine-tuning under DDP, DeepSpeed ZeRO-2 and ZeRO-3, packed and not, on a small grouped-query Qwen2
(bench/trainer_throughput.py's tiny model and word tokenizer) and ragged data a model learns in a few steps (each next
word follows from the last by a fixed permutation, so the loss falls far more than bf16's noise). Each run is `torchrun --nproc-per-node 1 -m
kubetune_trainer --config ...` with a config rendered from a FineTuneJob spec as the operator renders it; the runs
go in parallel (one GPU holds them all). A run passes when it exits 0, its losses are finite and its final loss is
below its first. Prints one JSON line per run (with the trainer's fastPath metrics) and exits 1 if any failed.

    python bench/gpu_runs.py [--cpu-rehearsal] [--steps 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO / "operator", REPO / "trainer_image", REPO / "bench"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

CASES: dict[str, dict[str, Any]] = {
    "ddp-lora": {"method": "lora", "backend": "ddp", "packing": False},
    "ddp-full": {"method": "full", "backend": "ddp", "packing": True},
    "zero2-lora": {"method": "lora", "backend": "deepspeed", "zero": 2, "packing": True},
    "zero2-full": {"method": "full", "backend": "deepspeed", "zero": 2, "packing": False},
    "zero3-lora": {"method": "lora", "backend": "deepspeed", "zero": 3, "packing": False},
    "zero3-full": {"method": "full", "backend": "deepspeed", "zero": 3, "packing": True},
    # The adapter methods that change the GPU path: DoRA's magnitude vectors, QLoRA's 4-bit NF4 base (bitsandbytes).
    "ddp-dora": {"method": "dora", "backend": "ddp", "packing": False},
    "ddp-qlora": {
        "method": "lora",
        "backend": "ddp",
        "packing": False,
        "quantization": {"bits": 4, "type": "nf4", "doubleQuant": True},
    },
}


def spec_for(case: dict[str, Any], work: Path, out: Path, steps: int, gpu: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"source": str(work / "model")},
        "dataset": {"train": str(work / ("missing.jsonl" if case.get("broken") else "chains.jsonl")), "format": "text", "maxSeqLength": 128, "packing": case["packing"]},
        "method": case["method"],
        "training": {"maxSteps": steps, "learningRate": 3e-3, "warmupSteps": 0,
                     "perDeviceBatchSize": 4, "globalBatchSize": 8, "loggingSteps": 1, "seed": 42},  # 2 micro-batches a step
        "distributed": {"nodes": 1, "procsPerNode": 1, "gpusPerNode": 1 if gpu else 0, "backend": case["backend"]},
        "output": {"uri": str(out), "checkpointSteps": max(2, steps // 2), "keepCheckpoints": 1, "mergeAdapter": False},
    }  # fmt: skip
    if "zero" in case:
        spec["distributed"]["zeroStage"] = case["zero"]
    if case["method"] in ("lora", "dora"):
        spec["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["all-linear"]}
    if "quantization" in case:
        spec["model"]["quantization"] = case["quantization"]
    return spec


def write_chains(work: Path, vocab: int, n: int = 256) -> None:
    """Ragged examples (16-120 words) where each word follows from the last by one fixed permutation."""
    import random

    import trainer_throughput as tt

    first = tt._vocab_cache(vocab)[2]
    words = list(range(first, vocab - 1))
    rng = random.Random(0)
    follow = dict(zip(words, rng.sample(words, len(words)), strict=True))
    with open(work / "chains.jsonl", "w") as handle:
        for _ in range(n):
            ids = [rng.choice(words)]
            for _ in range(rng.randint(15, 119)):
                ids.append(follow[ids[-1]])
            handle.write(json.dumps({"text": tt.ids_to_text(ids, vocab)}) + "\n")


def launch(
    name: str, case: dict[str, Any], work: Path, steps: int, gpu: bool
) -> tuple[subprocess.Popen, Path]:
    import socket

    from kubetune.api.models import FineTuneJobSpec
    from kubetune.render.trainer_config import render_trainer_config

    run_dir = work / name
    run_dir.mkdir()
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    spec = FineTuneJobSpec.model_validate(spec_for(case, work, run_dir / "out", steps, gpu))
    config = render_trainer_config(spec, name=f"check-{name}", uid=f"check-{name}", progress_port=ports[0])
    (run_dir / "trainer-config.yaml").write_text(config.dump_yaml())
    env = {**os.environ, "KUBETUNE_CACHE_DIR": str(run_dir / "cache"), "KUBETUNE_TERMINATION_LOG": str(run_dir / "termination-log"),
           "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer_image"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    if not gpu:
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
           "--master-port", str(ports[1]), "-m", "kubetune_trainer", "--config", str(run_dir / "trainer-config.yaml")]  # fmt: skip
    log = open(run_dir / "log", "w")
    return subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    ), run_dir


def verdict(name: str, code: int, run_dir: Path, seconds: float) -> dict[str, Any]:
    metrics_file = run_dir / "out" / "metrics.json"
    r: dict[str, Any] = {"run": name, "exit": code, "seconds": round(seconds, 1)}
    if code != 0 or not metrics_file.exists():
        r["ok"] = False
        r["log_tail"] = (run_dir / "log").read_text()[-3000:]
        return r
    m = json.loads(metrics_file.read_text())
    losses = [e["loss"] for e in m["lossCurve"]]
    r.update({"backend": m["backend"], "steps": m["steps"], "first_loss": losses[0], "final_loss": losses[-1],
              "fastPath": m.get("fastPath"), "chunkedLoss": m.get("chunkedLoss"), "tokensPerSecond": m.get("tokensPerSecond")})  # fmt: skip
    r["ok"] = all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-rehearsal", action="store_true", help="run on the CPU (only the device changes)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--runs", default=",".join(CASES), help=f"comma-separated subset of {list(CASES)}")
    ap.add_argument(
        "--first",
        default="",
        help="runs that go alone first (they compile the Triton kernels the others then find in the cache)",
    )
    ap.add_argument("--parallel", type=int, help="runs at once (default: 4 on a GPU, 2 on a CPU)")
    ap.add_argument("--timeout", type=int, help="seconds for all runs (default: $STAGE_LIMIT - 15, else 240)")
    ap.add_argument(
        "--sabotage",
        default="",
        help="make this run fail (its dataset does not exist): shows the others still report",
    )
    ap.add_argument("--out", help="also write the results as one JSON list here (rewritten after each run)")
    a = ap.parse_args(argv)
    import torch

    gpu = not a.cpu_rehearsal
    if gpu and not torch.cuda.is_available():
        ap.error("no CUDA device here; use --cpu-rehearsal")
    names = [n for n in a.runs.split(",") if n]
    first = [n for n in a.first.split(",") if n]
    unknown = [n for n in [*names, *first, *([a.sabotage] if a.sabotage else [])] if n not in CASES]
    if unknown:
        ap.error(f"unknown runs {unknown}; choose from {list(CASES)}")
    timeout = a.timeout or (int(os.environ["STAGE_LIMIT"]) - 15 if os.environ.get("STAGE_LIMIT") else 240)
    import trainer_throughput as tt

    results: list[dict[str, Any]] = []
    deadline = time.time() + timeout
    running: dict[str, tuple[subprocess.Popen, Path, float]] = {}

    def stop(
        signum: int, frame: Any
    ) -> None:  # the stage's timeout: the runs are in their own sessions, end them too
        for proc, _, _ in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    with tempfile.TemporaryDirectory(prefix="kubetune-gpu-runs-") as tmp:
        work = Path(tmp)
        p = {
            "tiny": True,
            "attn": "sdpa",
            "seq": 128,
            "mb": 4,
            "steps": a.steps * 4,
            "vocab": tt.model_config(True, "sdpa").vocab_size,
        }
        tt.prepare(p, work)
        write_chains(work, p["vocab"])
        queue = [n for n in first if n in names] + [n for n in names if n not in first]
        parallel = a.parallel or (4 if gpu else 2)
        print(
            f"{len(queue)} runs, {steps_note(a.steps)}, {len(first)} first, then at most {parallel} at a time; {timeout} s in all",
            flush=True,
        )
        while queue or running:
            gate = [
                n for n in first if n in running
            ]  # the first runs go alone (together), the rest wait for them
            while queue and len(running) < parallel and not (gate and queue[0] not in first):
                name = queue.pop(0)
                if (
                    time.time() > deadline - 10
                ):  # no time left to start it: say so rather than start and kill it
                    r = {
                        "run": name,
                        "exit": None,
                        "seconds": 0,
                        "ok": False,
                        "error": "not started: the stage's time ran out",
                    }
                    results.append(r)
                    print(json.dumps(r), flush=True)
                    continue
                case = {**CASES[name], "broken": name == a.sabotage}
                running[name] = (*launch(name, case, work, a.steps, gpu), time.time())
            for name, (proc, run_dir, started) in list(running.items()):
                code = proc.poll()
                if code is None and time.time() > deadline:
                    os.killpg(proc.pid, 9)
                    code = proc.wait()
                if code is not None:
                    del running[name]
                    r = verdict(name, code, run_dir, time.time() - started)
                    results.append(r)
                    print(json.dumps(r), flush=True)
                    if a.out:
                        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
            time.sleep(0.5)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    failed = [r["run"] for r in results if not r["ok"]]
    print(
        f"trainer runs on {'cuda' if gpu else 'cpu'}: "
        + (f"FAILED {failed}" if failed else f"all {len(results)} passed"),
        flush=True,
    )
    return 1 if failed else 0


def steps_note(steps: int) -> str:
    return f"{steps} steps of 2 micro-batches each"


if __name__ == "__main__":
    sys.exit(main())
