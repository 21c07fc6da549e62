"""The GPU check's first minute: do the fast path's kernels compute the right thing on this device?

1. Padding-free attention: the trainer's attention function (varlen_attn on CUDA in bf16) over one flattened row of
   ragged examples with grouped-query heads (14 query / 2 key-value, as Qwen2.5-0.5B), against SDPA run on each
   example alone in fp32 on the same inputs: outputs and the gradients of query, key and value. Also that it is
   causal (the first token of each example sees only itself).
2. The same at model level: a small Qwen2 on one flattened micro-batch vs each example alone (per-token loss and
   gradients), through the trainer's attention switch (attention.use).
3. The loss: on CUDA, Liger's fused linear cross-entropy (the trainer's CUDA loss) against loss.py's chunked torch
   function at the Qwen2.5-0.5B head shape in bf16, loss and gradients; without CUDA, loss.py against the plain
   F.linear + F.cross_entropy.
4. Fused AdamW skips a step on the device when the trainer's non-finite flag is set (its `found_inf`).

`--cpu-rehearsal` runs the same checks on the CPU (fp32, smaller shapes): only the device changes.
Prints one JSON line per check and exits 1 if any fails.

    python bench/gpu_preflight.py [--cpu-rehearsal] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO / "operator", REPO / "trainer_image"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

IGNORE = -100


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def check_attention(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from kubetune_trainer import attention

    g = torch.Generator(device="cpu").manual_seed(0)
    lengths = [300, 17, 1024, 1, 511] if device.type == "cuda" else [40, 3, 65, 1, 22]
    hq, hkv, d = 14, 2, 64
    total = sum(lengths)
    q, k, v = (
        torch.randn(1, h, total, d, generator=g).to(device, dtype).requires_grad_() for h in (hq, hkv, hkv)
    )
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)

    class Module(torch.nn.Module):
        training = True

    out, _ = attention.varlen_attention_forward(Module(), q, k, v, None, scaling=d**-0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                                max_length_q=max(lengths), max_length_k=max(lengths))  # fmt: skip
    grad_out = torch.randn(out.shape, generator=g).to(device, dtype)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), grad_out)

    # Reference: each example alone, SDPA in fp32 on the same (rounded) inputs.
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    pieces = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        pieces.append(
            F.scaled_dot_product_attention(
                qr[:, :, a:b], kr[:, :, a:b], vr[:, :, a:b], is_causal=True, scale=d**-0.5, enable_gqa=True
            )
        )
    ref = torch.cat(pieces, dim=2).transpose(1, 2)  # (1, T, H, D)
    rq, rk, rv = torch.autograd.grad(ref, (qr, kr, vr), grad_out.float())
    errs = {"out": rel_err(out, ref), "dq": rel_err(gq, rq), "dk": rel_err(gk, rk), "dv": rel_err(gv, rv)}
    # Causal: the first token of every example attends to itself only, so its output is its own value (per group).
    firsts = cu[:-1].long()
    own_v = v.detach()[0].repeat_interleave(hq // hkv, dim=0).transpose(0, 1)[firsts].float()
    causal = rel_err(out.detach()[0, firsts], own_v)
    tol = 2e-2 if dtype != torch.float32 else 1e-5
    path = "varlen_attn" if attention._half_dtype(q) is not None else "sdpa per example"
    ok = all(e < tol for e in errs.values()) and causal < tol
    return {"check": "attention", "path": path, "dtype": str(dtype), "heads": f"{hq}/{hkv}", "lengths": lengths,
            "rel_err": errs, "first_token_rel_err": causal, "tolerance": tol, "ok": ok}  # fmt: skip


def check_model(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """A small GQA Qwen2 through the trainer's attention switch: flattened micro-batch vs each example alone."""
    from kubetune_trainer import attention, batching
    from kubetune_trainer.data import Example
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    hidden = 448 if device.type == "cuda" else 112  # head_dim 64 on the GPU (as Qwen2.5), 16 on the CPU
    cfg = Qwen2Config(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=7,
                      num_key_value_heads=1, max_position_embeddings=2048, use_cache=False)  # fmt: skip
    model = Qwen2ForCausalLM(cfg).to(device)
    assert attention.use(model)
    g = torch.Generator().manual_seed(1)
    lengths = [200, 33, 511, 2] if device.type == "cuda" else [20, 7, 31, 2]
    exs = [
        Example(ids := torch.randint(0, 512, (n,), generator=g).tolist(), ids, list(range(n)))
        for n in lengths
    ]
    batch = {
        k: (v.to(device) if isinstance(v, torch.Tensor) else v)
        for k, v in batching.flatten(exs, max(lengths)).items()
    }
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def token_losses(b: dict[str, Any]) -> torch.Tensor:
        with autocast:
            logits = model(**b, use_cache=False).logits.float()
        labels = b["labels"][:, 1:]
        ce = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1).clamp(min=0), reduction="none"
        )
        return ce * (labels.reshape(-1) != IGNORE)

    model.zero_grad()
    together = token_losses(batch)
    together.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone = []
    for e in exs:
        loss = token_losses(
            {
                "input_ids": torch.tensor([e.input_ids], device=device),
                "labels": torch.tensor([e.labels], device=device),
            }
        )
        loss.sum().backward()
        alone.append(loss.detach())
    pieces, start = [], 0
    for n in lengths:
        pieces.append(together.detach()[start : start + n - 1])
        start += n
    loss_err = max(
        float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(pieces, alone, strict=True)
    )
    grad_err = max(rel_err(grads[n], p.grad) for n, p in model.named_parameters())
    tol_loss, tol_grad = (5e-2, 5e-2) if dtype != torch.float32 else (1e-4, 1e-4)
    return {"check": "model", "dtype": str(dtype), "lengths": lengths, "max_token_loss_diff": loss_err, "max_grad_rel_err": grad_err,
            "ok": loss_err < tol_loss and grad_err < tol_grad}  # fmt: skip


def check_loss(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from kubetune_trainer import kernels
    from kubetune_trainer import loss as loss_mod

    g = torch.Generator().manual_seed(2)
    tokens, hidden, vocab = (8192, 896, 151936) if device.type == "cuda" else (300, 64, 2048)
    h = (torch.randn(tokens, hidden, generator=g) * 0.5).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    labels[: tokens // 5] = IGNORE
    count = (labels != IGNORE).sum().float()
    chunk = loss_mod.chunk_tokens(vocab)
    reference = loss_mod.linear_cross_entropy(h, w, None, labels, chunk)  # loss.py's torch function
    rh, rw = torch.autograd.grad(reference, (h, w))
    if kernels.liger_available(device):
        name = f"liger fused linear cross-entropy (chunk_mem_const {kernels.LIGER_CHUNK_MEM_CONST})"
        got = kernels.fused_linear_cross_entropy_sum(h, w, None, labels) / count
    else:
        name = "plain F.linear + F.cross_entropy"
        got = (
            F.cross_entropy(F.linear(h.float(), w.float()), labels, ignore_index=IGNORE, reduction="sum")
            / count
        )
    gh, gw = torch.autograd.grad(got, (h, w))
    errs = {
        "loss": abs(float(got) - float(reference)) / abs(float(reference)),
        "dh": rel_err(gh, rh),
        "dw": rel_err(gw, rw),
    }
    tol = 2e-2 if dtype != torch.float32 else 1e-5
    return {"check": "loss", "against_loss_py": name, "dtype": str(dtype), "shape": [tokens, hidden, vocab], "rel_err": errs,
            "tolerance": tol, "ok": all(e < tol for e in errs.values())}  # fmt: skip


def _liger_or_eager(device: torch.device) -> bool:
    from kubetune_trainer import kernels

    return kernels.liger_available(device)


def check_liger(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Each Liger kernel the trainer patches in (RoPE, RMSNorm, SwiGLU) against the eager module it replaces, on the
    same inputs in `dtype`, forward and backward, both measured against an fp32 reference; then a small Qwen2 with
    kernels.apply_liger against the same model without. Without CUDA (Liger's kernels are Triton) the eager module
    stands in for the kernel, so the rehearsal runs every line but the kernels themselves."""
    from transformers import Qwen2Config
    from transformers.models.qwen2 import modeling_qwen2 as mq

    liger = _liger_or_eager(device)
    saved = {name: getattr(mq, name) for name in ("apply_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2MLP")}
    if any("liger" in getattr(v, "__module__", "") for v in saved.values()):
        return {"check": "liger", "ok": False, "error": f"transformers' Qwen2 is patched already: {saved}"}
    eager_rope, eager_norm, eager_mlp = (
        saved["apply_rotary_pos_emb"],
        saved["Qwen2RMSNorm"],
        saved["Qwen2MLP"],
    )
    if liger:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    else:
        liger_rotary_pos_emb, LigerRMSNorm, LigerSwiGLUMLP = eager_rope, eager_norm, eager_mlp  # type: ignore[assignment]
    g = torch.Generator().manual_seed(3)
    gpu = device.type == "cuda"
    hidden, inter, heads, kv, d, tokens = (896, 4864, 14, 2, 64, 4096) if gpu else (64, 176, 4, 2, 16, 96)
    cfg = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        rms_norm_eps=1e-6,
    )
    tol = 2e-2 if dtype != torch.float32 else 1e-5

    def compare(fn_kernel: Any, fn_eager: Any, inputs: list[torch.Tensor]) -> dict[str, Any]:
        """Outputs and gradients (of the inputs and the module's weights) of kernel and eager in dtype, and each
        against the eager module in fp32. Each fn(*inputs, dtype) returns (outputs, weights)."""

        def run(fn: Any, cast: torch.dtype) -> list[torch.Tensor]:
            xs = [x.detach().to(cast).requires_grad_() for x in inputs]
            outs, weights = fn(*xs, cast)
            outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
            gen = torch.Generator().manual_seed(9)
            grads = torch.autograd.grad(
                outs, xs + weights, [torch.randn(o.shape, generator=gen).to(device, o.dtype) for o in outs]
            )
            return [o.detach().float() for o in outs] + [gr.float() for gr in grads]

        kernel, eager, ref = run(fn_kernel, dtype), run(fn_eager, dtype), run(fn_eager, torch.float32)
        err: dict[str, Any] = {"kernel_vs_eager": max(rel_err(x, y) for x, y in zip(kernel, eager, strict=True)),
                               "kernel_vs_fp32": max(rel_err(x, y) for x, y in zip(kernel, ref, strict=True)),
                               "eager_vs_fp32": max(rel_err(x, y) for x, y in zip(eager, ref, strict=True)), "tensors": len(kernel)}  # fmt: skip
        # Passes when the kernel agrees with the eager module, or is as close to fp32 as the eager module is.
        err["ok"] = err["kernel_vs_eager"] < tol or err["kernel_vs_fp32"] <= 1.5 * err["eager_vs_fp32"] + 1e-6
        return err

    results: dict[str, Any] = {}
    # RoPE: (1, heads, T, d) query and (1, kv, T, d) key, Qwen2's cos/sin at position ids restarting per example.
    q = torch.randn(1, heads, tokens, d, generator=g).to(device)
    k = torch.randn(1, kv, tokens, d, generator=g).to(device)
    rotary = mq.Qwen2RotaryEmbedding(cfg).to(device)
    pos = (
        torch.cat([torch.arange(n) for n in (tokens // 2, tokens // 4, tokens - tokens // 2 - tokens // 4)])
        .unsqueeze(0)
        .to(device)
    )

    def rope(fn: Any) -> Any:
        def call(q_: torch.Tensor, k_: torch.Tensor, cast: torch.dtype) -> Any:
            cos, sin = rotary(q_, pos)
            return fn(q_, k_, cos.to(cast), sin.to(cast)), []

        return call

    results["rope"] = compare(rope(liger_rotary_pos_emb), rope(eager_rope), [q, k])
    # RMSNorm over (1, T, hidden) with a weight that is not all ones; its gradient too.
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(device)

    def norm(cls: Any) -> Any:
        def call(x_: torch.Tensor, cast: torch.dtype) -> Any:
            m = cls(hidden, eps=1e-6).to(device)
            m.weight.data.copy_(weight)
            m.to(cast)
            return m(x_), [m.weight]

        return call

    results["rms_norm"] = compare(
        norm(LigerRMSNorm), norm(eager_norm), [torch.randn(1, tokens, hidden, generator=g).to(device)]
    )
    # SwiGLU MLP: gate, up and down projections with the same weights; their gradients too.
    torch.manual_seed(4)
    state = {n: t.to(device) for n, t in eager_mlp(cfg).state_dict().items()}

    def mlp(cls: Any) -> Any:
        def call(x_: torch.Tensor, cast: torch.dtype) -> Any:
            m = cls(cfg).to(device)
            m.load_state_dict(state)
            m.to(cast)
            return m(x_), list(m.parameters())

        return call

    results["swiglu"] = compare(
        mlp(LigerSwiGLUMLP),
        mlp(eager_mlp),
        [0.5 * torch.randn(1, tokens // 4, hidden, generator=g).to(device)],
    )
    results["model"] = _liger_model(device, dtype, liger, saved, tol)
    ok = all(r["ok"] for r in results.values())
    return {"check": "liger", "kernels": "liger (Triton)" if liger else "eager stands in (no CUDA)", "dtype": str(dtype),
            "shape": {"tokens": tokens, "hidden": hidden, "intermediate": inter, "heads": f"{heads}/{kv}"}, **results,
            "tolerance": tol, "ok": ok}  # fmt: skip


def _liger_model(
    device: torch.device, dtype: torch.dtype, liger: bool, saved: dict[str, Any], tol: float
) -> dict[str, Any]:
    """A small Qwen2: kernels.apply_liger (what the trainer does) vs the same weights without, loss and gradients."""
    import copy

    from kubetune_trainer import kernels
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2 import modeling_qwen2 as mq

    torch.manual_seed(5)
    hidden = 448 if device.type == "cuda" else 64
    cfg = Qwen2Config(vocab_size=512, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2, num_attention_heads=7 if hidden == 448 else 4,
                      num_key_value_heads=1, max_position_embeddings=2048, use_cache=False, attn_implementation="sdpa")  # fmt: skip
    eager = Qwen2ForCausalLM(cfg).to(device)
    patched = copy.deepcopy(eager)
    ids = torch.randint(
        0, 512, (2, 256 if device.type == "cuda" else 32), generator=torch.Generator().manual_seed(6)
    ).to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def loss_grads(model: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with autocast:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}

    eager_loss, eager_grads = loss_grads(eager)
    try:
        applied = kernels.apply_liger(patched)
        got_loss, got_grads = loss_grads(patched)
    finally:
        for name, value in saved.items():  # apply_liger patches transformers' module globals: put them back
            setattr(mq, name, value)
    if liger and applied != ["rope", "rms_norm", "swiglu"]:
        return {"ok": False, "error": f"kernels.apply_liger patched {applied}"}
    loss_diff = abs(float(got_loss - eager_loss))
    grad_err = max(rel_err(got_grads[n], g) for n, g in eager_grads.items())
    return {
        "patched": applied,
        "loss_diff": loss_diff,
        "max_grad_rel_err": grad_err,
        "ok": loss_diff < 5 * tol and grad_err < 5 * tol,
    }


def check_compile(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """torch.compile of each decoder layer (kernels.compile_layers, KUBETUNE_COMPILE=1) against the same model eager:
    a small Qwen2 through the trainer's attention switch on one flattened micro-batch of ragged examples, loss and
    every gradient. Also counts dynamo's graph breaks."""
    import copy
    import os

    import torch._dynamo
    from kubetune_trainer import attention, batching, kernels
    from kubetune_trainer.data import Example
    from torch._dynamo.utils import counters
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(7)
    gpu = device.type == "cuda"
    hidden = 448 if gpu else 64
    cfg = Qwen2Config(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=7 if gpu else 4,
                      num_key_value_heads=1, max_position_embeddings=2048, use_cache=False)  # fmt: skip
    eager = Qwen2ForCausalLM(cfg).to(device)
    assert attention.use(eager)
    compiled = copy.deepcopy(eager)
    old = os.environ.get(kernels.ENV_COMPILE)
    os.environ[kernels.ENV_COMPILE] = "1"
    try:
        layers = kernels.compile_layers(compiled)
    finally:
        if old is None:
            os.environ.pop(kernels.ENV_COMPILE)
        else:
            os.environ[kernels.ENV_COMPILE] = old
    g = torch.Generator().manual_seed(8)
    lengths = [200, 33, 511, 2] if gpu else [20, 7, 31, 2]
    exs = [
        Example(ids := torch.randint(0, 512, (n,), generator=g).tolist(), ids, list(range(n)))
        for n in lengths
    ]
    batch = {
        k: (v.to(device) if isinstance(v, torch.Tensor) else v)
        for k, v in batching.flatten(exs, max(lengths)).items()
    }
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def loss_grads(model: Any) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        with autocast:
            logits = model(**batch, use_cache=False).logits.float()
        labels = batch["labels"][:, 1:].reshape(-1)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels, ignore_index=IGNORE)
        loss.backward()
        return float(loss), {n: p.grad.float().clone() for n, p in model.named_parameters()}

    counters.clear()
    started = time.time()
    got_loss, got_grads = loss_grads(compiled)
    first = time.time() - started
    got_loss2, _ = loss_grads(compiled)  # a second step: no recompilation needed, same answer
    eager_loss, eager_grads = loss_grads(eager)
    breaks = sum(counters["graph_break"].values())
    graphs = counters["stats"]["unique_graphs"]
    loss_diff = abs(got_loss - eager_loss)
    grad_err = max(rel_err(got_grads[n], gr) for n, gr in eager_grads.items())
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    torch._dynamo.reset()
    return {"check": "compile", "dtype": str(dtype), "layers_compiled": layers, "lengths": lengths, "loss": got_loss, "eager_loss": eager_loss,
            "loss_diff": loss_diff, "second_step_loss_diff": abs(got_loss2 - got_loss), "max_grad_rel_err": grad_err, "graphs_compiled": graphs, "graph_breaks": breaks,
            "first_step_seconds": round(first, 1), "tolerance": tol,
            "ok": layers == cfg.num_hidden_layers and graphs > 0 and loss_diff < tol and grad_err < tol and abs(got_loss2 - got_loss) < tol}  # fmt: skip


def check_skip(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Fused AdamW skips a step on the device when the trainer's non-finite flag is set (steps.set_found_inf)."""
    from kubetune_trainer import steps

    p = torch.nn.Parameter(torch.ones(1024, device=device))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.full_like(p, 0.5)
    steps.set_found_inf(opt, torch.tensor([1.0, 0.0], device=device))
    opt.step()
    skipped = bool(torch.equal(p.detach(), torch.ones_like(p))) and float(opt.state[p]["step"]) == 0
    steps.set_found_inf(opt, torch.tensor([0.0, 0.0], device=device))
    opt.step()
    updated = not torch.equal(p.detach(), torch.ones_like(p))
    return {"check": "skip", "what": "fused AdamW with found_inf", "skipped_when_flagged": skipped, "updated_otherwise": updated,
            "ok": skipped and updated}  # fmt: skip


CHECKS = {
    "attention": check_attention,
    "model": check_model,
    "loss": check_loss,
    "liger": check_liger,
    "skip": check_skip,
    "compile": check_compile,
}
DEFAULT_CHECKS = ("attention", "model", "loss", "liger", "skip")  # compile: call B (bench/gpu_check.sh)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--cpu-rehearsal", action="store_true", help="run on the CPU in fp32 (only the device changes)"
    )
    ap.add_argument("--checks", default=",".join(DEFAULT_CHECKS), help=f"comma-separated, of {list(CHECKS)}")
    ap.add_argument("--out", help="also write the results as one JSON list here (rewritten after each check)")
    a = ap.parse_args(argv)
    unknown = [c for c in a.checks.split(",") if c not in CHECKS]
    if unknown:
        ap.error(f"unknown checks {unknown}; choose from {list(CHECKS)}")
    if not a.cpu_rehearsal and not torch.cuda.is_available():
        ap.error("no CUDA device here; use --cpu-rehearsal")
    device = torch.device("cpu" if a.cpu_rehearsal else "cuda")
    dtype = torch.float32 if a.cpu_rehearsal else torch.bfloat16
    results = []
    for check in (CHECKS[c] for c in a.checks.split(",")):
        started = time.time()
        try:
            r = check(device, dtype)
        except Exception as exc:  # a broken kernel is a failed check, reported with the others
            r = {
                "check": check.__name__.removeprefix("check_"),
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
            }
        r["seconds"] = round(time.time() - started, 2)
        results.append(r)
        print(json.dumps(r), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    failed = [r["check"] for r in results if not r["ok"]]
    print(f"pre-flight on {device}: " + (f"FAILED {failed}" if failed else "all checks passed"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
