"""bench/gpu_check.sh, rehearsed on the CPU: its pre-flight stage runs end to end and passes, and the pre-flight's
attention check catches a kernel that is not causal (the varlen_attn trap: a window given as a list)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


def test_cpu_rehearsal_preflight_passes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "RESULTS_DIR": str(tmp_path / "results")}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu-rehearsal", "--stages", "preflight"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    checks = json.loads((tmp_path / "preflight.json").read_text())
    assert [c["check"] for c in checks] == ["attention", "model", "loss", "skip"]
    assert all(c["ok"] for c in checks), checks
    assert "every stage passed" in proc.stdout


def test_preflight_catches_attention_that_is_not_causal(monkeypatch: pytest.MonkeyPatch) -> None:
    import gpu_preflight
    import torch.nn.functional as F
    from kubetune_trainer import attention

    def full_attention(q, k, v, cu, scale, window):  # type: ignore[no-untyped-def]
        out = torch.empty_like(q)
        bounds = cu.tolist()
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            qs, ks, vs = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=True).squeeze(0).transpose(0, 1)
        return out

    monkeypatch.setattr(attention, "_sdpa_per_segment", full_attention)
    result = gpu_preflight.check_attention(torch.device("cpu"), torch.float32)
    assert not result["ok"]
