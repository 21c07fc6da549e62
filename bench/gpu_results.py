"""The GPU check's results file, rebuilt after every stage of bench/gpu_check.sh so that a call cut off at any point
leaves a complete file for the stages that finished. Standard library only.

    python bench/gpu_results.py merge --out OUT --state STATE --call a   # -> OUT/results/<device>-<date>.json
    python bench/gpu_results.py summary --out OUT --call a                # one line per stage; exit 1 if one failed
    python bench/gpu_results.py combine A.json B.json --out FILE          # call A's file + call B's (another machine)

The file has trainer_throughput.py's keys at the top level (device, date, settings, one key per mode) and
`gpu_check`: `stages` (per call and stage: exit code, seconds, limit), `env` (versions and device per call), and the
verdicts of `preflight`, `runs` and `compile`. In call B the file starts from call A's (kept in STATE on the warm
machine), so B's results file holds both calls.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path
from typing import Any

MODES = ("full", "lora", "ragged_full", "ragged_lora")
PARTS = ("preflight", "runs", "compile")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower().split(" (")[0]).strip("-")


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent, or cut off mid-write by a killed stage: the stage's exit code says so


def stages(out: Path) -> list[dict[str, Any]]:
    path = out / "stages.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def merge(out: Path, state: Path | None, call: str) -> Path:
    base = _read(state / "results.json") if state is not None and call != "a" else None
    report: dict[str, Any] = base if isinstance(base, dict) else {}
    env = _read(out / "env.json") or {}
    throughput = _read(out / "throughput.json")
    if isinstance(throughput, dict):
        report.update({k: v for k, v in throughput.items() if k not in MODES})
        report.update({m: throughput[m] for m in MODES if m in throughput})
    report.setdefault("device", env.get("device", "unknown device"))
    report.setdefault("date", dt.date.today().isoformat())
    check = report.setdefault("gpu_check", {})
    check.setdefault("env", {})[call] = env
    check.setdefault("stages", {})[call] = stages(out)
    for part in PARTS:
        value = _read(out / f"{part}.json")
        if value is not None:
            check[part] = value
    name = f"{slug(report['device'])}-{report['date']}.json"
    text = json.dumps(report, indent=2) + "\n"
    (out / "results").mkdir(parents=True, exist_ok=True)
    for path in [out / "results" / name, *([state / "results.json"] if state is not None else [])]:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return out / "results" / name


def summary(out: Path, call: str) -> int:
    failed = []
    for s in stages(out):
        verdict = (
            "ok"
            if s["exit"] == 0
            else (
                "TIMED OUT"
                if s["exit"] in (124, 137)
                else ("SKIPPED (no time left)" if s["exit"] == -1 else "FAILED")
            )
        )
        cpu = f"  ({s['cpu_seconds']:.0f} s of CPU)" if "cpu_seconds" in s else ""
        print(
            f"  {s['stage']:<13} exit {s['exit']:>4}  {s['seconds']:>5} s of {s['limit']:>3} s{cpu}  {verdict}"
        )
        if s["exit"] != 0:
            failed.append(s["stage"])
    print(f"call {call}: " + (f"FAILED stages: {', '.join(failed)}" if failed else "every stage passed"))
    return 1 if failed else 0


def combine(paths: list[Path], out: Path) -> None:
    parts = [json.loads(p.read_text()) for p in paths]
    devices = {p["device"] for p in parts}
    if len(devices) != 1:
        raise SystemExit(f"results from different devices: {sorted(devices)}")
    merged = parts[0]
    for part in parts[1:]:
        merged.update({m: part[m] for m in MODES if m in part})
        check = merged.setdefault("gpu_check", {})
        for key, value in part.get("gpu_check", {}).items():
            if key in ("env", "stages"):
                check.setdefault(key, {}).update(value)
            else:
                check[key] = value
    merged["combined_from"] = [p.name for p in paths]
    out.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--state", type=Path)
    m.add_argument("--call", required=True)
    s = sub.add_parser("summary")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--call", required=True)
    c = sub.add_parser("combine")
    c.add_argument("files", type=Path, nargs="+")
    c.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if a.cmd == "merge":
        print(f"results: {merge(a.out, a.state, a.call)}")
        return 0
    if a.cmd == "summary":
        return summary(a.out, a.call)
    combine(a.files, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
