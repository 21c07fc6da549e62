"""Training throughput: a plain Hugging Face Trainer vs kubetune's trainer, same model, same data, same seed.

One invocation runs, for each mode (full, lora, ragged_full, ragged_lora), the baseline exactly as
/work/shared/bench/hf_trainer_baseline.py measured it (transformers.Trainer with default settings, random-weight
Qwen2.5-0.5B architecture, random tokens, bf16, micro-batch MB, steps WARMUP..STEPS timed) and kubetune's trainer
through its real entry point (`kubetune_trainer.__main__.main(["--config", ...])`, a TrainerConfig rendered from a
FineTuneJob spec exactly like the operator renders it). It prints tokens/s, MFU, peak memory, final loss and the
ratios, and writes bench/results/<device>-<date>.json.

GPU (the speed issue's setting):       python bench/trainer_throughput.py
CPU smoke (tiny Qwen2, ratios only):   python bench/trainer_throughput.py --tiny        (the default without CUDA)
Smallest (CI):                         python bench/trainer_throughput.py --tiny --steps 4 --warmup 1 --seq 64 --mb 2

How the two sides are made identical:
- Model: the baseline builds Qwen2ForCausalLM(cfg) after torch.manual_seed(0); the same initial weights are saved
  (config.json + safetensors) with a word-level tokenizer ("t0".."t<V-1>", one word per id) so that kubetune's
  `text` dataset format tokenizes back to exactly the same token ids.
- Data: random ids from torch.Generator seed 0, every sequence ending in the tokenizer's EOS (kubetune's `text` format
  appends EOS). Fixed length SEQ for full/lora; lognormal lengths around 350*SEQ/2048 (mean ~471 at SEQ 2048) for
  the ragged modes. Both sides train on the same pool; each shuffles it with seed 42 in its own way.
- Ragged modes: the baseline pads to the longest in each batch (as in the issue); kubetune runs with
  spec.dataset.packing=true (its own packing, per-sequence position_ids). Because packed rows hold more tokens, the
  ragged pool is large enough for STEPS packed steps; the baseline draws STEPS batches from the same pool, so the
  final losses of the ragged modes come after different token counts. Only non-padding tokens are counted.
- Timing: steps WARMUP+1..STEPS, after a device sync, for both. kubetune is observed through two read-only hooks
  (its progress report each step and its collate function, to count tokens); nothing in its maths is changed.
- Peak memory: torch.cuda.max_memory_allocated on GPU; on CPU the peak RSS growth during the run (sampled), which is
  only a smoke figure.
- Precision: the baseline uses bf16 autocast (fp32 weights) on GPU, fp32 on CPU; kubetune uses what its config
  resolves (precision/dtype auto: bf16 on GPU, fp32 on CPU).
On GPU every run is a fresh subprocess (clean memory peak, fresh Accelerate state); on CPU all runs share this
process to keep the smoke test short (--isolate / --no-isolate override).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO / "operator", REPO / "trainer_image"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

MODES = ("full", "lora", "ragged_full", "ragged_lora")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
}
KEYS = (
    "tokens_per_s",
    "baseline_tokens_per_s",
    "peak_mem_gib",
    "baseline_peak_mem_gib",
    "mfu",
    "final_loss",
    "baseline_final_loss",
)


# ----------------------------------------------------------------------------- settings


def model_config(tiny: bool, attn: str) -> Any:
    from transformers import Qwen2Config

    if tiny:
        return Qwen2Config(vocab_size=2048, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                           max_position_embeddings=4096, attn_implementation=attn)  # fmt: skip
    # Exactly the baseline script's config (Qwen2.5-0.5B architecture).
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=32768, attn_implementation=attn)  # fmt: skip


def ragged_lengths(n: int, seq: int, seed: int = 0) -> list[int]:
    """The baseline's lognormal lengths (median 350, sigma 0.8, in [16, SEQ] at SEQ 2048), scaled to other SEQ."""
    rng = random.Random(seed)
    median, low = 350 * seq / 2048, max(4, int(16 * seq / 2048))
    return [max(low, min(seq, int(math.exp(rng.gauss(math.log(median), 0.8))))) for _ in range(n)]


def make_data(p: dict[str, Any], ragged: bool) -> list[list[int]]:
    """Token id lists, deterministic: uniform over the tokenizer's word ids, the last one EOS (= vocab-1)."""
    import torch

    vocab, seq, mb, steps = p["vocab"], p["seq"], p["mb"], p["steps"]
    if ragged:
        lens = ragged_lengths(10 * mb * steps + 64, seq)
        # Enough examples for STEPS packed micro-batches of SEQ tokens (plus slack for greedy packing's waste).
        need, total, n = 1.25 * mb * steps * seq, 0, 0
        while total < need and n < len(lens):
            total += lens[n]
            n += 1
        lens = lens[: max(n, mb * steps)]
    else:
        lens = [seq] * (mb * steps)
    first_word = _vocab_cache(vocab)[2]
    g = torch.Generator().manual_seed(0)
    return [
        (first_word + torch.randint(0, vocab - 1 - first_word, (n - 1,), generator=g)).tolist() + [vocab - 1]
        for n in lens
    ]


def peak_flops(device: str) -> float | None:
    for key, flops in PEAK_FLOPS.items():
        if key in device.upper():
            return flops
    return None


def mfu(tok_s: float, mode: str, n_params: int, cfg: Any, seq: int, device: str) -> float | None:
    """The baseline script's formula: 6N (full) / 4N (LoRA) + attention, per token, against the dense bf16 peak."""
    peak = peak_flops(device)
    if peak is None:
        return None
    span = 350 * seq / 2048 if mode.startswith("ragged") else seq
    per_tok = (
        6 if mode.endswith("full") else 4
    ) * n_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * span
    return tok_s * per_tok / peak


# ----------------------------------------------------------------------------- memory


class PeakMemory:
    """GPU: max_memory_allocated. CPU: peak RSS growth over the run, sampled every 5 ms."""

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()

    def __enter__(self) -> PeakMemory:
        import torch

        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return self
        import psutil

        self.proc, self.start, self.peak, self.stop = psutil.Process(), 0, 0, threading.Event()
        self.start = self.peak = self.proc.memory_info().rss

        def sample() -> None:
            while not self.stop.wait(0.005):
                self.peak = max(self.peak, self.proc.memory_info().rss)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.cuda:
            self.stop.set()
            self.thread.join()

    @property
    def gib(self) -> float:
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        return max(0, self.peak - self.start) / 2**30


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; a fresh run in the same process needs them cleared."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    os.environ.pop("ACCELERATE_USE_CPU", None)


# ----------------------------------------------------------------------------- model directory


LETTERS = "abcdefghijklmnopqrstuvwxyz"
EOS = "<|endoftext|>"


def word_vocab(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]], int]:
    """A byte-level BPE vocabulary that Qwen2's tokenizer class (which AutoTokenizer forces for model_type qwen2)
    maps back exactly: every data token is one word " xyzw" (space + L letters), built from its letters by a chain
    of merges; the pieces on the way take the first ids. Returns (vocab, merges, first word id); EOS is vocab_size-1."""
    import itertools

    tokens, merges, level = ["\u0120", *LETTERS], [], 1
    while True:
        words_needed = vocab_size - 1 - len(tokens)
        if 26**level >= words_needed:
            break
        for combo in itertools.product(LETTERS, repeat=level):  # prefixes of the next level
            tokens.append("\u0120" + "".join(combo))
            merges.append((tokens[-1][:-1], tokens[-1][-1]))
        level += 1
    first_word = len(tokens)
    for combo in itertools.islice(itertools.product(LETTERS, repeat=level), words_needed):
        tokens.append("\u0120" + "".join(combo))
        merges.append((tokens[-1][:-1], tokens[-1][-1]))
    tokens.append(EOS)
    return {t: i for i, t in enumerate(tokens)}, merges, first_word


def ids_to_text(ids: list[int], vocab_size: int) -> str:
    """Text whose tokenization is `ids` (word ids only, EOS excluded)."""
    inverse = _vocab_cache(vocab_size)[3]
    return "".join(" " + inverse[i][1:] for i in ids)


_VOCABS: dict[int, Any] = {}


def _vocab_cache(vocab_size: int) -> Any:
    if vocab_size not in _VOCABS:
        vocab, merges, first = word_vocab(vocab_size)
        _VOCABS[vocab_size] = (vocab, merges, first, sorted(vocab, key=vocab.__getitem__))
    return _VOCABS[vocab_size]


def write_model_dir(p: dict[str, Any], directory: Path) -> None:
    """Random weights (seed 0, as the baseline; built on the GPU when there is one: 0.5B parameters take 30-40 s to
    initialise on the CPU) + the word tokenizer above. Both trainers load this directory."""
    import torch
    from transformers import Qwen2ForCausalLM
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    cfg = model_config(p["tiny"], p["attn"])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(directory, safe_serialization=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the measured runs are other processes: leave them the memory
    vocab, merges = _vocab_cache(cfg.vocab_size)[:2]
    Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token=EOS, pad_token=EOS, unk_token=EOS).save_pretrained(
        directory
    )


PREPARED_KEYS = ("tiny", "attn", "seq", "mb", "steps", "vocab")


def prepare(p: dict[str, Any], work: Path) -> None:
    """Model dir and one text jsonl per data kind, shared by every run (and every subprocess). A directory prepared
    with the same settings is reused (bench/gpu_check.sh's calls share one: the 0.5B model's 2 GB are written once)."""
    stamp = work / "prepared.json"
    wanted = {k: p[k] for k in PREPARED_KEYS}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        print(f"reusing {work} (prepared with the same settings)", flush=True)
        return
    work.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    write_model_dir(p, work / "model")
    for kind in ("fixed", "ragged"):
        data = make_data(p, kind == "ragged")
        (work / f"{kind}.json").write_text(json.dumps(data))
        with open(work / f"{kind}.jsonl", "w") as handle:
            for ids in data:  # kubetune's `text` format appends EOS itself
                handle.write(json.dumps({"text": ids_to_text(ids[:-1], p["vocab"])}) + "\n")
    stamp.write_text(json.dumps(wanted))


# ----------------------------------------------------------------------------- baseline


def run_baseline(p: dict[str, Any], mode: str, work: Path) -> dict[str, Any]:
    """Verbatim the shared baseline's run(): default TrainingArguments, its collate, its timing callback."""
    import peft
    import torch
    import transformers
    from transformers import Qwen2ForCausalLM, Trainer, TrainingArguments

    on_gpu, ragged = torch.cuda.is_available(), mode.startswith("ragged")
    cfg = model_config(p["tiny"], p["attn"])
    data = json.loads((work / ("ragged.json" if ragged else "fixed.json")).read_text())
    mb, steps, warm = p["mb"], p["steps"], p["warmup"]

    class DS(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> dict[str, Any]:
            x = torch.tensor(data[i])
            return {"input_ids": x, "labels": x}

    def collate(b: list[dict[str, Any]]) -> dict[str, Any]:
        L = max(len(e["input_ids"]) for e in b)
        ids = torch.zeros(len(b), L, dtype=torch.long)
        lab = torch.full((len(b), L), -100)
        att = torch.zeros(len(b), L, dtype=torch.long)
        for k, e in enumerate(b):
            n = len(e["input_ids"])
            ids[k, :n], lab[k, :n], att[k, :n] = e["input_ids"], e["labels"], 1
        return {"input_ids": ids, "labels": lab, "attention_mask": att}

    # The saved model directory (the same seed-0 weights kubetune loads), not a fresh build on the CPU: for the 0.5B
    # model that build took 30-40 s per baseline process. fp32 weights, as the baseline script's model.
    m = Qwen2ForCausalLM.from_pretrained(
        work / "model", dtype=torch.float32, attn_implementation=cfg._attn_implementation
    )
    n_all = sum(x.numel() for x in m.parameters())
    if mode.endswith("lora"):
        m = peft.get_peft_model(m, peft.LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))

    class Timer(transformers.TrainerCallback):
        t = 0.0
        marks: dict[
            int, float
        ] = {}  # step -> time after it, as kubetune's side records them (a sync each step)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == warm:
                sync()
                self.t = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step > warm:
                sync()
                self.marks[state.global_step] = time.perf_counter()

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            self.dt = time.perf_counter() - self.t
            self.n = state.global_step - warm

    class LossTrainer(Trainer):  # keeps each step's (already detached) loss tensor; adds no sync
        losses: list[Any] = []

        def training_step(self, *a: Any, **k: Any) -> Any:
            loss = super().training_step(*a, **k)
            self.losses.append(loss)
            return loss

    cb = Timer()
    (work / "runs").mkdir(exist_ok=True)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(dir=work / "runs"), per_device_train_batch_size=mb, max_steps=steps, bf16=on_gpu,
                             use_cpu=not on_gpu, logging_steps=1000, save_strategy="no", report_to=[],
                             dataloader_num_workers=p["workers"])  # fmt: skip
    tr = LossTrainer(model=m, args=args, train_dataset=DS(), callbacks=[cb], data_collator=collate)
    with PeakMemory() as mem:
        tr.train()
    mean_len = sum(len(x) for x in data) / len(data)
    tok = (mean_len if ragged else p["seq"]) * cb.n * mb / cb.dt  # the baseline script's count
    losses = [float(x) for x in tr.losses]
    per_step = (mean_len if ragged else p["seq"]) * mb
    step_seconds = {
        s: cb.marks[s] - cb.t for s in sorted(cb.marks)
    }  # elapsed from the timed start to the end of step s
    return {
        "tokens_per_s": tok,
        "peak_mem_gib": mem.gib,
        "final_loss": losses[-1],
        "loss_curve": losses,
        "params": n_all,
        "seconds": cb.dt,
        "timed_steps": cb.n,
        "tokens_through": {s: per_step * (s - warm) for s in step_seconds},
        "seconds_through": step_seconds,
    }


# ----------------------------------------------------------------------------- kubetune


def kubetune_spec(p: dict[str, Any], mode: str, work: Path, out: Path) -> dict[str, Any]:
    """A FineTuneJob spec with the baseline's hyper-parameters (transformers' defaults: lr 5e-5, linear, no warmup)."""
    import torch

    ragged = mode.startswith("ragged")
    spec: dict[str, Any] = {
        "model": {"source": str(work / "model")},
        "dataset": {
            "train": str(work / ("ragged.jsonl" if ragged else "fixed.jsonl")),
            "format": "text",
            "maxSeqLength": p["seq"],
            "packing": ragged and p["pack"],
        },
        "method": "lora" if mode.endswith("lora") else "full",
        "training": {
            "maxSteps": p["steps"],
            "learningRate": 5e-5,
            "scheduler": "linear",
            "warmupSteps": 0,
            "weightDecay": 0.0,
            "maxGradNorm": 1.0,
            "perDeviceBatchSize": p["mb"],
            "loggingSteps": 1,
            "seed": 42,
        },
        "distributed": {"nodes": 1, "procsPerNode": 1, "gpusPerNode": 1 if torch.cuda.is_available() else 0},
        "output": {"uri": str(out), "checkpointSteps": 10**6, "keepCheckpoints": 1, "mergeAdapter": False},
    }
    if mode.endswith("lora"):
        spec["lora"] = {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": LORA_TARGETS}
    spec = json.loads(json.dumps(spec))
    for item in p.get("kubetune_set", []):  # --set a.b=value, as the trainer's own --set
        key, _, raw = item.partition("=")
        node = spec
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        import yaml

        node[parts[-1]] = yaml.safe_load(raw)
    return spec


def run_kubetune(p: dict[str, Any], mode: str, work: Path) -> dict[str, Any]:
    import socket

    import torch
    from kubetune.api.models import FineTuneJobSpec
    from kubetune.render.trainer_config import render_trainer_config
    from kubetune_trainer import __main__ as entry
    from kubetune_trainer import loop as loop_mod

    (work / "runs").mkdir(exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f"kubetune-{mode}-", dir=work / "runs"))
    spec = FineTuneJobSpec.model_validate(kubetune_spec(p, mode, work, run_dir / "out"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = render_trainer_config(
        spec, name=f"bench-{mode.replace('_', '-')}", uid=f"bench-{run_dir.name}", progress_port=port
    )
    (run_dir / "trainer-config.yaml").write_text(config.dump_yaml())
    os.environ["KUBETUNE_CACHE_DIR"] = str(run_dir / "cache")
    os.environ["KUBETUNE_TERMINATION_LOG"] = str(run_dir / "termination-log")

    # A read-only observation hook: a timestamp per optimizer step (report). Tokens come from the trainer's own
    # loss curve (inputTokens per report: every token the model ran on; it never computes padding).
    marks: dict[int, float] = {}
    orig_report = loop_mod.StepLoop.report

    def timed_report(self: Any, *args: Any) -> None:
        orig_report(self, *args)
        sync()
        marks[self.state.step] = time.perf_counter()
        timed_report.trainer = self  # type: ignore[attr-defined]

    # What `torchrun --nproc-per-node 1` gives the process (the trainer's launcher in its pod).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        master_port = s.getsockname()[1]
    torchrun_env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "0",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port)}  # fmt: skip
    saved_env = {k: os.environ.get(k) for k in torchrun_env}
    os.environ.update(torchrun_env)
    loop_mod.StepLoop.report = timed_report
    try:
        with PeakMemory() as mem:
            code = entry.main(["--config", str(run_dir / "trainer-config.yaml")])
    finally:
        loop_mod.StepLoop.report = orig_report
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if code != 0:
        raise RuntimeError(
            f"kubetune trainer exited {code}: {(run_dir / 'termination-log').read_text() if (run_dir / 'termination-log').exists() else ''}"
        )
    trainer = timed_report.trainer  # type: ignore[attr-defined]
    steps, warm = trainer.state.step, p["warmup"]
    if steps <= warm:
        raise RuntimeError(
            f"kubetune ran only {steps} steps (<= warmup {warm}); more data or fewer warmup steps"
        )
    tokens = sum(e["inputTokens"] for e in trainer.state.loss_curve if warm < e["step"] <= steps)
    seconds = marks[steps] - marks[warm]
    curve = [e["loss"] for e in trainer.state.loss_curve]
    step_tokens = {e["step"]: e["inputTokens"] for e in trainer.state.loss_curve}
    through = {
        s: sum(step_tokens.get(t, 0) for t in range(warm + 1, s + 1)) for s in range(warm + 1, steps + 1)
    }
    del trainer
    return {
        "tokens_per_s": tokens / seconds,
        "peak_mem_gib": mem.gib,
        "final_loss": curve[-1],
        "loss_curve": curve,
        "seconds": seconds,
        "timed_steps": steps - warm,
        "packing": spec.dataset.packing,
        "tokens_through": through,
        "seconds_through": {s: marks[s] - marks[warm] for s in range(warm + 1, steps + 1) if s in marks},
    }


# ----------------------------------------------------------------------------- driver


def run_one(p: dict[str, Any], impl: str, mode: str, work: Path) -> dict[str, Any]:
    import gc

    import torch

    reset_accelerate()
    try:
        return (run_baseline if impl == "baseline" else run_kubetune)(p, mode, work)
    finally:
        reset_accelerate()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_isolated(p: dict[str, Any], impl: str, mode: str, work: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps({"p": p, "impl": impl, "mode": mode, "work": str(work)}),
    ]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH-RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stdout.write(proc.stdout[-6000:])
        raise RuntimeError(f"{impl} {mode}: worker exited {proc.returncode}")
    return json.loads(lines[-1][len("BENCH-RESULT ") :])


def device_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower().split(" (")[0]).strip("-")


def speedup_by_timed_steps(b: dict[str, Any], k: dict[str, Any]) -> dict[str, float]:
    """The tokens/s ratio had only the first n timed steps been timed (n = 1, 2, 4, 8, ...): how soon it settles."""
    bt, bs = ({int(s): v for s, v in b[key].items()} for key in ("tokens_through", "seconds_through"))
    kt, ks = ({int(s): v for s, v in k[key].items()} for key in ("tokens_through", "seconds_through"))
    b0, k0 = min(bs, default=0) - 1, min(ks, default=0) - 1  # the last untimed step of each
    out: dict[str, float] = {}
    n = 1
    while True:
        n_last = min(n, b["timed_steps"], k["timed_steps"])
        sb, sk = b0 + n_last, k0 + n_last
        if sb in bs and sk in ks and bs[sb] > 0 and ks[sk] > 0:
            out[str(n_last)] = round((kt[sk] / ks[sk]) / (bt[sb] / bs[sb]), 4)
        if n_last < n or n_last == min(b["timed_steps"], k["timed_steps"]):
            return out
        n *= 2


def mode_result(
    b: dict[str, Any], k: dict[str, Any], mode: str, p: dict[str, Any], cfg: Any, device: str, on_gpu: bool
) -> dict[str, Any]:
    return {
        "tokens_per_s": k["tokens_per_s"],
        "baseline_tokens_per_s": b["tokens_per_s"],
        "peak_mem_gib": k["peak_mem_gib"],
        "baseline_peak_mem_gib": b["peak_mem_gib"],
        "mfu": mfu(k["tokens_per_s"], mode, b["params"], cfg, p["seq"], device) if on_gpu else None,
        "baseline_mfu": mfu(b["tokens_per_s"], mode, b["params"], cfg, p["seq"], device) if on_gpu else None,
        "final_loss": k["final_loss"],
        "baseline_final_loss": b["final_loss"],
        "speedup": k["tokens_per_s"] / b["tokens_per_s"],
        "mem_ratio": k["peak_mem_gib"] / b["peak_mem_gib"]
        if b["peak_mem_gib"] > 0.01
        else None,  # CPU RSS growth of a tiny model is noise
        "speedup_by_timed_steps": speedup_by_timed_steps(b, k),
        "loss_curve": k["loss_curve"],
        "baseline_loss_curve": b["loss_curve"],
        "timed_steps": k["timed_steps"],
        "baseline_timed_steps": b["timed_steps"],
        "seconds": k["seconds"],
        "baseline_seconds": b["seconds"],
        "packing": k["packing"],
    }


def write_report(
    out: Path,
    device: str,
    torch_version: str,
    tiny: bool,
    p: dict[str, Any],
    modes: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """Merge `modes` into the report at `out` (other modes, from earlier invocations on this device, are kept) and
    write it whole, atomically: after each mode the file is complete for the modes done."""
    report: dict[str, Any] = {}
    if out.exists():
        with contextlib.suppress(ValueError):
            old = json.loads(out.read_text())
            if old.get("device") == device:
                report = old
    report.update({"device": device, "date": dt.date.today().isoformat(), "torch": torch_version, "tiny_model": tiny,
                   "settings": {k: v for k, v in p.items() if k != "kubetune_set"} | {"kubetune_set": p["kubetune_set"]},
                   "peak_mem_note": "GPU: torch.cuda.max_memory_allocated; CPU: sampled peak RSS growth during the run"})  # fmt: skip
    report.setdefault("wall_seconds_by_mode", {}).update({m: round(seconds, 1) for m in modes})
    report.update(modes)  # per-mode keys at the top level, as the speed issue specifies
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--tiny", action="store_true", help="tiny Qwen2 config (default without CUDA)")
    ap.add_argument("--seq", type=int, help="sequence length (2048 GPU, 128 tiny)")
    ap.add_argument("--mb", type=int, help="micro-batch (8 GPU, 4 tiny)")
    ap.add_argument("--steps", type=int, help="optimizer steps (30 GPU, 10 tiny)")
    ap.add_argument("--warmup", type=int, help="untimed first steps (5 GPU, 2 tiny)")
    ap.add_argument(
        "--workers", type=int, default=None, help="baseline dataloader workers (2 as the baseline; 0 tiny)"
    )
    ap.add_argument(
        "--attn",
        default="sdpa",
        help="baseline model attn_implementation (the kubetune model dir gets the same)",
    )
    ap.add_argument(
        "--no-pack", dest="pack", action="store_false", help="ragged modes: kubetune without packing"
    )
    ap.add_argument(
        "--set",
        dest="kubetune_set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra FineTuneJob spec field for kubetune's runs, e.g. training.gradientCheckpointing=true",
    )
    ap.add_argument(
        "--isolate",
        dest="isolate",
        action="store_true",
        default=None,
        help="a subprocess per run (default on GPU)",
    )
    ap.add_argument("--no-isolate", dest="isolate", action="store_false")
    ap.add_argument(
        "--out",
        help="result JSON path (default bench/results/<device>-<date>.json); modes are merged into it, written after each",
    )
    ap.add_argument(
        "--work",
        help="model directory and data here, reused when prepared with the same settings (default: a temp dir)",
    )
    ap.add_argument(
        "--combine",
        nargs="+",
        metavar="JSON",
        help="merge the modes of earlier result files (same device) into --out",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.combine:
        parts = [json.loads(Path(x).read_text()) for x in a.combine]
        devices = {part["device"] for part in parts}
        if len(devices) != 1:
            ap.error(f"results from different devices: {sorted(devices)}")
        merged = {**parts[0]}
        for part in parts[1:]:
            merged.update({m: part[m] for m in MODES if m in part})
        merged["combined_from"] = [Path(x).name for x in a.combine]
        out = (
            Path(a.out)
            if a.out
            else REPO / "bench" / "results" / f"{slug(merged['device'])}-{merged['date']}.json"
        )
        out.write_text(json.dumps(merged, indent=2) + "\n")
        print(f"wrote {out} with modes {[m for m in MODES if m in merged]}")
        return merged

    if a.worker:
        job = json.loads(a.worker)
        print(
            "BENCH-RESULT " + json.dumps(run_one(job["p"], job["impl"], job["mode"], Path(job["work"]))),
            flush=True,
        )
        return {}

    import torch

    on_gpu = torch.cuda.is_available()
    tiny = a.tiny or not on_gpu
    modes = [m for m in a.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m}; choose from {MODES}")
    p = {"tiny": tiny, "attn": a.attn, "pack": a.pack, "kubetune_set": a.kubetune_set,
         "seq": a.seq or (128 if tiny else 2048), "mb": a.mb or (4 if tiny else 8), "steps": a.steps or (10 if tiny else 30),
         "warmup": a.warmup if a.warmup is not None else (2 if tiny else 5),
         "workers": a.workers if a.workers is not None else (0 if tiny else 2)}  # fmt: skip
    p["vocab"] = model_config(tiny, a.attn).vocab_size
    if p["steps"] <= p["warmup"]:
        ap.error("--steps must exceed --warmup")
    isolate = on_gpu if a.isolate is None else a.isolate
    device = device_name()
    print(
        f"device {device}; torch {torch.__version__}; settings {json.dumps(p)}; isolate={isolate}", flush=True
    )

    started = time.time()
    out = (
        Path(a.out)
        if a.out
        else REPO / "bench" / "results" / f"{slug(device)}-{dt.date.today().isoformat()}.json"
    )
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        work = (
            Path(a.work)
            if a.work
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kubetune-bench-")))
        )
        prepare(p, work)
        stack.callback(
            shutil.rmtree, work / "runs", True
        )  # each run's output (2 GB in full mode): not kept with the model
        report: dict[str, Any] = {}
        for mode in modes:
            mode_started = time.time()
            row: dict[str, Any] = {}
            for impl in ("baseline", "kubetune"):
                r = (run_isolated if isolate else run_one)(p, impl, mode, work)
                row[impl] = r
                print(
                    f"  {mode:<12} {impl:<9} {r['tokens_per_s']:>12,.0f} tok/s  peak {r['peak_mem_gib']:.3f} GiB  final loss {r['final_loss']:.4f}",
                    flush=True,
                )
            results[mode] = mode_result(
                row["baseline"], row["kubetune"], mode, p, model_config(tiny, a.attn), device, on_gpu
            )
            r = results[mode]
            by_steps = ", ".join(f"{n}: {x:.2f}x" for n, x in r["speedup_by_timed_steps"].items())
            print(f"  {mode:<12} RATIO {r['speedup']:.2f}x tokens/s" + (f", memory {r['mem_ratio']:.2f}x" if r["mem_ratio"] is not None else "")
                  + (f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else "") + f"; over the first n timed steps {{{by_steps}}}", flush=True)  # fmt: skip
            report = write_report(
                out, device, torch.__version__, tiny, p, {mode: results[mode]}, time.time() - mode_started
            )

    print(
        f"\n{'mode':<12} {'kubetune tok/s':>15} {'baseline tok/s':>15} {'speedup':>8} {'MFU':>6} {'peak GiB':>9} {'base GiB':>9} {'mem ratio':>9} {'loss':>8} {'base loss':>9}"
    )
    for mode, r in results.items():
        mf = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mr = f"{r['mem_ratio']:.2f}" if r["mem_ratio"] is not None else "-"
        print(f"{mode:<12} {r['tokens_per_s']:>15,.0f} {r['baseline_tokens_per_s']:>15,.0f} {r['speedup']:>7.2f}x {mf:>6} "
              f"{r['peak_mem_gib']:>9.3f} {r['baseline_peak_mem_gib']:>9.3f} {mr:>9} {r['final_loss']:>8.4f} {r['baseline_final_loss']:>9.4f}")  # fmt: skip
    print(f"\nwrote {out} ({round(time.time() - started, 1)} s)")
    return report


if __name__ == "__main__":
    main()
