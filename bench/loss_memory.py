"""Peak memory and time of the causal-LM loss: the model's own (full logits) vs kubetune's chunked one.

The vocabulary projection + cross-entropy at the speed issue's shape (Qwen2.5-0.5B: hidden 896,
vocabulary 151,936) is the largest memory term of fine-tuning. This measures exactly that piece,
forward + backward, on whatever device is here:

- `model`: what transformers does (`lm_head` -> logits -> `.float()` -> cross-entropy, the
  loss function of `ForCausalLMLoss`), i.e. what the baseline HF Trainer runs;
- `chunked`: `kubetune_trainer.loss.linear_cross_entropy`, what the trainer runs.

Each side runs in a fresh subprocess so peaks are clean: on GPU `torch.cuda.max_memory_allocated`
above what the inputs take, on CPU the process's peak RSS growth. It also checks that the two
losses and gradients agree. Prints a table; `--out` writes JSON.

    .venv/bin/python bench/loss_memory.py                    # CPU: 2 x 1024 tokens
    python3 bench/loss_memory.py --tokens 16384 --dtype bf16 # GPU: micro-batch 8 x 2048
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer_image")]


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def one(kind: str, tokens: int, hidden: int, vocab: int, dtype: str, reps: int) -> dict[str, object]:
    import torch
    import torch.nn.functional as F
    from kubetune_trainer.loss import linear_cross_entropy

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=g) * 0.5).to(dev, dt).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(dev, dt).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g).to(dev)
    y[::5] = -100

    def step() -> torch.Tensor:
        if kind == "model":
            loss = F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100)
        else:
            loss = linear_cross_entropy(h, w, None, y)
        loss.backward()
        return loss

    step()  # warm-up (allocator, kernels)
    h.grad = w.grad = None
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mib()
    t0 = time.perf_counter()
    for _ in range(reps):
        h.grad = w.grad = None
        loss = step()
    if dev == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / reps
    if dev == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    assert h.grad is not None and w.grad is not None
    return {
        "peak_mib": peak,
        "seconds": seconds,
        "loss": float(loss),
        "grad_h_norm": float(h.grad.float().norm()),
        "grad_w_norm": float(w.grad.float().norm()),
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="micro-batch x sequence length")
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", type=Path)
    p.add_argument("--child", choices=["model", "chunked"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(one(a.child, a.tokens, a.hidden, a.vocab, a.dtype, a.reps)))
        return 0
    rows = {}
    for kind in ("model", "chunked"):
        cmd = [sys.executable, __file__, "--child", kind, "--tokens", str(a.tokens), "--hidden", str(a.hidden),
               "--vocab", str(a.vocab), "--dtype", a.dtype, "--reps", str(a.reps)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return 1
        rows[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    m, c = rows["model"], rows["chunked"]
    result = {
        "device": m["device"],
        "date": time.strftime("%Y-%m-%d"),
        "settings": {
            "tokens": a.tokens,
            "hidden": a.hidden,
            "vocab": a.vocab,
            "dtype": a.dtype,
            "reps": a.reps,
        },
        "model": m,
        "chunked": c,
        "mem_ratio": c["peak_mib"] / m["peak_mib"] if m["peak_mib"] > 0 else None,
        "time_ratio": c["seconds"] / m["seconds"],
        "loss_rel_diff": abs(c["loss"] - m["loss"]) / abs(m["loss"]),
        "grad_w_rel_diff": abs(c["grad_w_norm"] - m["grad_w_norm"]) / m["grad_w_norm"],
    }
    print(f"device {m['device']}, {a.tokens} tokens x vocab {a.vocab} x hidden {a.hidden}, {a.dtype}")
    print(f"{'':10} {'peak MiB':>10} {'s/step':>8} {'loss':>10}")
    for kind in ("model", "chunked"):
        r = rows[kind]
        print(f"{kind:10} {r['peak_mib']:>10.0f} {r['seconds']:>8.3f} {r['loss']:>10.5f}")
    mem = f"{result['mem_ratio']:.2f}x" if result["mem_ratio"] is not None else "n/a"
    print(f"chunked / model: memory {mem}, time {result['time_ratio']:.2f}x; "
          f"loss differs by {result['loss_rel_diff']:.1e}, |grad W| by {result['grad_w_rel_diff']:.1e} (relative)")  # fmt: skip
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
