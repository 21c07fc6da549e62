"""Peak memory of reading a large JSON-array dataset: kubetune's streamed reader vs loading the array whole.

Writes a JSON array of about `--mb` MB (records of ~1 kB, one record of `--largest-mb` MB in the
middle), then in fresh subprocesses measures the peak RSS growth over the process's size after
imports of:

- `whole`: `json.load` of the file, what reading a JSON array did before (and what most loaders do);
- `kubetune`: `records.iter_records`, each record read and dropped (the trainer keeps token ids,
  not records), what the trainer runs now.

Prints the figures and the ratio of the streamed peak to the largest record; `--out` writes JSON.

    .venv/bin/python bench/dataset_memory.py --mb 300 --largest-mb 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_array(path: Path, mb: int, largest_mb: int) -> int:
    """The array file; returns the size of the largest record in bytes."""
    row = json.dumps({"prompt": "x" * 480, "completion": "y" * 480})
    big = json.dumps({"prompt": "z" * (largest_mb << 20), "completion": "w"})
    n = (mb << 20) // (len(row) + 2)
    with open(path, "w") as out:
        out.write("[")
        for i in range(n):
            out.write((",\n" if i else "\n") + (big if i == n // 2 else row))
        out.write("\n]\n")
    return len(big)


CHILD = """
import json, resource, sys
sys.path[:0] = [{operator!r}, {trainer!r}]
from pathlib import Path
from kubetune_trainer import records
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
base = rss()
path = Path({path!r})
if {mode!r} == "whole":
    rows = json.load(open(path)); n = len(rows)
else:
    n = sum(1 for _ in records.iter_records(path, 64 << 20))
print(json.dumps({{"records": n, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base}}))
"""


def measure(path: Path, mode: str) -> dict[str, int]:
    code = CHILD.format(
        operator=str(REPO / "operator"), trainer=str(REPO / "trainer_image"), path=str(path), mode=mode
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=300)
    parser.add_argument("--largest-mb", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.json"
        largest = write_array(path, args.mb, args.largest_mb)
        size = path.stat().st_size
        result = {"fileBytes": size, "largestRecordBytes": largest}
        for mode in ("kubetune", "whole"):
            result[mode] = measure(path, mode)
    mib = 1 << 20
    k, w = result["kubetune"]["peak"], result["whole"]["peak"]
    print(
        f"JSON array {size / mib:.0f} MiB, {result['kubetune']['records']} records, largest record {largest / mib:.1f} MiB"
    )
    print(f"  json.load (whole):       peak RSS growth {w / mib:8.1f} MiB ({w / size:.1f}x the file)")
    print(
        f"  kubetune (streamed):     peak RSS growth {k / mib:8.1f} MiB ({k / largest:.2f}x the largest record)"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
