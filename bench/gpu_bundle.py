"""The GPU check's wheel bundle (.whl/, built by bench/gpu_wheels.sh): slim a wheel, check the bundle's size, verify an
install of it. Standard library only (it runs before anything is installed).

    python bench/gpu_bundle.py slim .whl/bitsandbytes-*.whl --keep cuda130 cpu   # drop the other native libraries
    python bench/gpu_bundle.py size .whl --max-mib 48 --carry-limit-mib 64       # exit 1 when too big
    python bench/gpu_bundle.py verify .whl SITE                                  # every wheel installed in SITE, as built
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import sys
import tempfile
import zipfile
from pathlib import Path

NATIVE = re.compile(
    r"^(?P<pkg>[^/]+)/lib(?P=pkg)_(?P<variant>[a-z]+[0-9]*)\.so$"
)  # bitsandbytes/libbitsandbytes_cuda130.so


def native_variants(names: list[str]) -> dict[str, str]:
    """{variant: member} for a package's per-backend native libraries (cuda118, cuda130, cpu, rocm64, xpu2025, ...)."""
    return {m["variant"]: name for name in names if (m := NATIVE.match(name))}


def slim(wheel: Path, keep: list[str]) -> tuple[int, int]:
    """Rewrite `wheel` in place without the native libraries not in `keep`; RECORD loses their lines. Returns sizes."""
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        variants = native_variants(names)
        missing = [k for k in keep if k not in variants]
        if missing:
            raise SystemExit(f"{wheel.name}: no native library for {missing}; it has {sorted(variants)}")
        drop = {member for variant, member in variants.items() if variant not in keep}
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        with tempfile.NamedTemporaryFile(dir=wheel.parent, suffix=".whl", delete=False) as tmp:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
                for info in src.infolist():
                    if info.filename in drop:
                        continue
                    data = src.read(info)
                    if info.filename == record:
                        lines = data.decode().splitlines()
                        data = (
                            "\n".join(line for line in lines if line.split(",", 1)[0] not in drop) + "\n"
                        ).encode()
                    dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    Path(tmp.name).replace(wheel)
    after = wheel.stat().st_size
    print(
        f"{wheel.name}: kept {sorted(keep)} of {sorted(variants)}; {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB"
    )
    return before, after


def check_record(wheel: Path) -> list[str]:
    """Members whose RECORD hash or presence disagrees (empty when the wheel is consistent)."""
    problems = []
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        listed = set()
        for line in z.read(record).decode().splitlines():
            path, digest, _ = line.rsplit(",", 2)
            listed.add(path)
            if path not in names:
                problems.append(f"{path}: in RECORD, not in the wheel")
            elif digest:
                algo, _, want = digest.partition("=")
                got = base64.urlsafe_b64encode(hashlib.new(algo, z.read(path)).digest()).rstrip(b"=").decode()
                if got != want:
                    problems.append(f"{path}: hash differs from RECORD")
        problems += [f"{n}: in the wheel, not in RECORD" for n in names - listed if not n.endswith("/")]
    return problems


def size(bundle: Path, max_mib: float, carry_limit_mib: float) -> int:
    wheels = sorted(bundle.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for w in sorted(wheels, key=lambda w: -w.stat().st_size):
        print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    verdict = "ok" if total <= max_mib * 2**20 else "TOO BIG"
    print(f"{total / 2**20:7.2f} MiB  in all ({len(wheels)} wheels; ceiling {max_mib} MiB, {carry_limit_mib - total / 2**20:.1f} MiB "
          f"under the {carry_limit_mib} MiB carry limit): {verdict}")  # fmt: skip
    return 0 if verdict == "ok" else 1


def verify(bundle: Path, site: Path) -> int:
    """Each wheel's distribution is installed in SITE at the wheel's version; native libraries are the wheel's only."""
    problems = []
    for wheel in sorted(bundle.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        if not (site / f"{name}-{version}.dist-info").is_dir():
            problems.append(f"{wheel.name}: no {name}-{version}.dist-info in {site}")
        with zipfile.ZipFile(wheel) as z:
            wanted = set(native_variants(z.namelist()))
        if wanted:
            pkg = next(iter(native_variants(zipfile.ZipFile(wheel).namelist()).values())).split("/")[0]
            present = set(native_variants([f"{pkg}/{p.name}" for p in (site / pkg).glob("*.so")]))
            if present != wanted:
                problems.append(
                    f"{pkg}: native libraries {sorted(present)} installed, wheel has {sorted(wanted)}"
                )
        problems += [f"{wheel.name}: {p}" for p in check_record(wheel)]
    for p in problems:
        print(p)
    print(f"bundle install in {site}: " + ("ok" if not problems else f"{len(problems)} problems"))
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("slim")
    s.add_argument("wheel", type=Path)
    s.add_argument("--keep", nargs="+", required=True)
    z = sub.add_parser("size")
    z.add_argument("bundle", type=Path)
    z.add_argument("--max-mib", type=float, required=True)
    z.add_argument("--carry-limit-mib", type=float, default=64)
    v = sub.add_parser("verify")
    v.add_argument("bundle", type=Path)
    v.add_argument("site", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "slim":
        slim(a.wheel, a.keep)
        problems = check_record(a.wheel)
        print("\n".join(problems) or f"{a.wheel.name}: RECORD consistent")
        return 1 if problems else 0
    if a.cmd == "size":
        return size(a.bundle, a.max_mib, a.carry_limit_mib)
    return verify(a.bundle, a.site)


if __name__ == "__main__":
    sys.exit(main())
