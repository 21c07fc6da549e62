"""What this machine's Python holds, printed before anything can fail on it: the versions of the packages the GPU
check needs (read from their metadata, nothing imported), the device (nvidia-smi), then, with --imports, an import of
each module, one line per failure. Writes the lot as JSON (--out). Exit 1 when an import failed.

    python bench/gpu_versions.py [--imports] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DISTS = ("torch", "triton", "transformers", "tokenizers", "huggingface-hub", "safetensors", "regex", "accelerate", "peft",
         "deepspeed", "liger-kernel", "bitsandbytes", "pydantic", "pydantic-core", "hjson", "numpy", "psutil", "pyyaml")  # fmt: skip
# The modules the trainer and the benchmarks import, in an order where a failure names its cause.
MODULES = ("torch", "regex", "huggingface_hub", "tokenizers", "safetensors", "transformers", "accelerate", "peft", "pydantic",
           "hjson", "deepspeed", "liger_kernel.transformers", "bitsandbytes", "kubetune.api.models", "kubetune_trainer.train")  # fmt: skip


def versions() -> dict[str, Any]:
    found: dict[str, Any] = {}
    for dist in DISTS:
        try:
            d = md.distribution(dist)
            found[dist] = f"{d.version} ({Path(str(d.locate_file(''))).as_posix()})"
        except md.PackageNotFoundError:
            found[dist] = None
    return found


def gpu() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    q = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    return subprocess.run(q, capture_output=True, text=True, timeout=30).stdout.strip() or None


def imports() -> tuple[dict[str, str], dict[str, Any]]:
    errors, extra = {}, {}
    for module in MODULES:
        started = time.time()
        try:
            importlib.import_module(module)
        except Exception as exc:  # every failure is reported, not only the first
            errors[module] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        extra[f"import {module} s"] = round(time.time() - started, 2)
    if "torch" not in errors:
        import torch

        extra["cuda"] = torch.version.cuda
        extra["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return errors, extra


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--imports", action="store_true")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    report: dict[str, Any] = {"python": sys.version.split()[0], "gpu": gpu(), "versions": versions()}
    print(f"python {report['python']}; gpu: {report['gpu']}")
    for dist, version in report["versions"].items():
        print(f"  {dist:<16} {version or '-'}")
    code = 0
    if a.imports:
        errors, extra = imports()
        report.update(extra, import_errors=errors)
        for module, error in errors.items():
            print(f"  import {module}: {error}")
        print(
            "imports: "
            + (f"{len(errors)} failed" if errors else f"all {len(MODULES)} ok")
            + f"; device {extra.get('device')}"
        )
        code = 1 if errors else 0
    import platform

    report["device"] = (
        report.get("device")
        or (report["gpu"] or "").split(",")[0]
        or f"cpu ({platform.processor() or platform.machine()})"
    )
    if a.out:
        a.out.write_text(json.dumps(report, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
