"""The operator, trainer and pause images for the real-kubelet mode, built with no daemon and no pull.

    layers = build_all()            # cached under <cache>/images, keyed by content (one builder at a time)
    import_all(layers, ctr_argv)    # `ctr -n k8s.io images import -` of each changed image (new
                                    # blobs only), then prune of older versions

Every image is an OCI image with uncompressed layers:

* base: a Debian minbase root filesystem with python3, made by `mmdebstrap` (the same
  Debian release as the CI machine, so its Python 3.11 runs the wheels of the test venv);
* deps (one layer, or two for the trainer: torch + nvidia-* alone, ~4.6 GB and stable, then the
  rest, which changes whenever a dependency is added): a virtualenv at /opt/kubetune holding
  exactly the installed distributions that
  `kubetune[operator]` (operator image) or `kubetune[trainer]` + pyarrow (trainer image)
  require, copied from the running venv (so torch is not downloaded a second time; the
  versions are the ones .ci/constraints.txt pins), with their console scripts;
* app: this repository's `kubetune` and `kubetune_trainer` packages, a `kubetune` user
  (uid 1000) and the image config of operator_image/Dockerfile / trainer_image/Dockerfile
  (user 1000, entrypoint, PATH).

The names are the chart's defaults (charts/kubetune/values.yaml), so `helm install` with
default values runs these images. What differs from the Dockerfiles: a Debian base instead
of python:3.11-slim / the CUDA base, and the venv copied instead of `pip install`ed.

`KUBETUNE_E2E_IMAGES=dockerfiles`: instead, operator_image/Dockerfile and trainer_image/Dockerfile themselves,
built by buildah (chroot isolation, the host's network: nothing on the host's network changes) on a Debian base
made by mmdebstrap and given as their base build argument, their pip steps reading a wheelhouse that `pip wheel`
fills from pip's cache (--no-index --find-links), each image pushed uncompressed into an OCI layout under the
cache and imported from there (new blobs only, like the assembled images). Not the default yet: building the
trainer's torch layer (4.6 GB) needs about 20 GB of free disk at its peak (see e2e/README.md).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO

import tomllib
import yaml
from packaging.requirements import Requirement

from .binaries import cache_dir, ensure

REPO = Path(__file__).resolve().parents[2]
DEBIAN_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "ca-certificates")
PY = f"python{sys.version_info.major}.{sys.version_info.minor}"
VENV = "opt/kubetune"
SITE = f"{VENV}/lib/{PY}/site-packages"
PATH = "/opt/kubetune/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PAUSE_IMAGE = "kubetune.local/pause:e2e"
# not needed on CPU and 640 MB: torch imports it only for torch.compile on GPUs
SKIP_DISTS = {"triton"}


def chart_images() -> tuple[str, str]:
    """(operator image, trainer image) as the chart's default values name them."""
    chart = REPO / "charts" / "kubetune"
    values = yaml.safe_load((chart / "values.yaml").read_text())
    app_version = yaml.safe_load((chart / "Chart.yaml").read_text())["appVersion"]
    op = f"{values['image']['repository']}:{values['image']['tag'] or app_version}"
    return op, str(values["trainerImage"])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def images_dir() -> Path:
    d = cache_dir() / "images"
    (d / "layers").mkdir(parents=True, exist_ok=True)
    return d


# -- layers ------------------------------------------------------------------------------


def _cached_layer(key: str, write: Callable[[tarfile.TarFile], None]) -> Path:
    """<images>/layers/<key>.tar, written once by `write` (an uncompressed layer tar)."""
    out = images_dir() / "layers" / f"{key}.tar"
    if out.exists():
        return out
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        write(tar)
    tmp.rename(out)
    return out


def base_layer(packages: Sequence[str] = BASE_PACKAGES, where: Path | None = None) -> Path:
    """Debian minbase + python3 from mmdebstrap (about 100 s cold)."""
    args = ["--variant=minbase", f"--include={','.join(packages)}", "--format=tar", DEBIAN_SUITE]
    key = "base-" + _sha(json.dumps(args).encode())[:16]
    out = (where or images_dir() / "layers") / f"{key}.tar"
    if not out.exists():
        if not shutil.which("mmdebstrap"):
            raise RuntimeError("mmdebstrap not found: apt-get install mmdebstrap (see e2e/README.md)")
        tmp = out.with_suffix(".tmp")
        t0 = time.monotonic()
        subprocess.run(["mmdebstrap", "--quiet", *args, str(tmp)], check=True)
        tmp.rename(out)
        print(f"images: base rootfs built in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    return out


def _expand_project(requirements: Iterable[str]) -> list[str]:
    """`kubetune[extra]` -> the requirements this repository's pyproject.toml declares (not the
    installed metadata, which is as old as the last `pip install -e`)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out: list[str] = []
    for r in requirements:
        req = Requirement(r)
        if req.name != project["name"]:
            out.append(r)
            continue
        out += project["dependencies"]
        for extra in req.extras:
            out += project["optional-dependencies"][extra]
    return out


def _closure(requirements: Iterable[str]) -> list[metadata.Distribution]:
    """The installed distributions the requirements need (markers evaluated, extras followed)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [(Requirement(r), "") for r in _expand_project(requirements)]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in SKIP_DISTS:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise RuntimeError(
                f"{req.name} is required by the images but not installed in {sys.prefix}: "
                "pip install -c .ci/constraints.txt -e '.[operator,trainer,dev]'"
            ) from None
        for ex in req.extras or {""}:
            key = f"{name}[{ex}]"
            if key in seen:
                continue
            seen[key] = dist
            todo += [(Requirement(r), ex) for r in dist.requires or []]
    unique = {d.metadata["Name"].lower(): d for d in seen.values()}
    unique.pop("kubetune", None)  # the app layer carries this repository's code
    return [unique[k] for k in sorted(unique)]


def _top_levels(dist: metadata.Distribution) -> set[str]:
    """site-packages entries (package dirs, modules, dist-info, .libs) of one distribution."""
    tops: set[str] = set()
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if parts and parts[0] not in ("..", "__pycache__") and not str(f).endswith(".pth"):
            tops.add(parts[0])
    return tops


def _scripts(dists: Sequence[metadata.Distribution]) -> dict[str, str]:
    out = {}
    for d in dists:
        for ep in d.entry_points.select(group="console_scripts"):
            mod, _, attr = ep.value.partition(":")
            out[ep.name] = (
                f"#!/{VENV}/bin/python\nimport sys\nfrom {mod.strip()} import {attr.strip()}\n"
                f"sys.exit({attr.strip()}())\n"
            )
    return out


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, 0
    tar.addfile(info)


def _owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _heavy(dist: metadata.Distribution) -> bool:
    """torch and the CUDA wheels it pulls (nvidia-*): gigabytes, and they change only with the torch pin."""
    name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
    return name == "torch" or name.startswith("nvidia-")


def deps_layers(requirements: Sequence[str]) -> list[Path]:
    """/opt/kubetune: a venv with the installed closure of `requirements` and its console scripts, as
    up to two layers: torch + nvidia-* (~4.6 GB, stable) and everything else (changes whenever a
    dependency is added or bumped; re-imported alone then)."""
    site = Path(sysconfig.get_paths()["purelib"])
    dists = _closure(requirements)
    heavy = [d for d in dists if _heavy(d)]
    rest = [d for d in dists if not _heavy(d)]
    heavy_tops = {t for d in heavy for t in _top_levels(d)}

    def key(kind: str, ds: Sequence[metadata.Distribution]) -> str:
        ident = [f"{d.metadata['Name']}=={d.version}" for d in ds]
        # not the venv's path: a fresh checkout's venv (a new CI clone) holds the same files, and rebuilding and
        # re-importing 4.8 GB for it would cost minutes per run
        return f"{kind}-" + _sha(json.dumps([PY, sys.version, ident]).encode())[:16]

    def add_tops(tar: tarfile.TarFile, tops: Iterable[str]) -> None:
        # once each: namespace packages (nvidia/) are shared by many distributions
        for top in sorted(tops):
            if (site / top).exists():
                tar.add(site / top, arcname=f"{SITE}/{top}", filter=_owned_by_root)

    def skeleton(tar: tarfile.TarFile) -> None:
        for d in ("opt", VENV, f"{VENV}/bin", f"{VENV}/lib", f"{VENV}/lib/{PY}", SITE):
            _add_dir(tar, d)

    def write_heavy(tar: tarfile.TarFile) -> None:
        skeleton(tar)
        add_tops(tar, heavy_tops)

    def write_rest(tar: tarfile.TarFile) -> None:
        skeleton(tar)
        pyver = ".".join(map(str, sys.version_info[:3]))
        _add_bytes(
            tar,
            f"{VENV}/pyvenv.cfg",
            f"home = /usr/bin\ninclude-system-site-packages = false\nversion = {pyver}\n".encode(),
        )
        for link in ("python", "python3", PY):
            info = tarfile.TarInfo(f"{VENV}/bin/{link}")
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, f"/usr/bin/{PY}", 0o777
            tar.addfile(info)
        for name, text in _scripts(dists).items():
            _add_bytes(tar, f"{VENV}/bin/{name}", text.encode(), 0o755)
        add_tops(tar, {t for d in rest for t in _top_levels(d)} - heavy_tops)

    layers = [_cached_layer(key("torch", heavy), write_heavy)] if heavy else []
    return [*layers, _cached_layer(key("venv", dists), write_rest)]


def app_layer(base: Path, scripts: dict[str, str]) -> Path:
    """This repository's packages into the venv, and the kubetune user (uid/gid 1000)."""
    srcs = [REPO / "operator" / "kubetune", REPO / "trainer_image" / "kubetune_trainer"]
    files = sorted(
        (p, p.relative_to(s.parent))
        for s in srcs
        for p in s.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    h = hashlib.sha256(base.name.encode() + json.dumps(scripts, sort_keys=True).encode())
    for p, rel in files:
        h.update(str(rel).encode() + b"\0" + p.read_bytes())
    key = "app-" + h.hexdigest()[:16]

    def etc(name: str) -> bytes:
        with tarfile.open(base) as t:
            f = t.extractfile(f"./etc/{name}") or t.extractfile(f"etc/{name}")
            assert f is not None
            return f.read()

    def write(tar: tarfile.TarFile) -> None:
        _add_bytes(tar, "etc/passwd", etc("passwd") + b"kubetune:x:1000:1000::/home/kubetune:/bin/sh\n")
        _add_bytes(tar, "etc/group", etc("group") + b"kubetune:x:1000:\n")
        home = tarfile.TarInfo("home/kubetune")
        home.type, home.mode, home.uid, home.gid = tarfile.DIRTYPE, 0o755, 1000, 1000
        tar.addfile(home)
        for name, text in scripts.items():
            _add_bytes(tar, f"{VENV}/bin/{name}", text.encode(), 0o755)
        for p, rel in files:
            tar.add(p, arcname=f"{SITE}/{rel}", filter=_owned_by_root, recursive=False)
        # package metadata, so importlib.metadata finds kubetune and `kubetune` resolves
        version = yaml.safe_load((REPO / "charts" / "kubetune" / "Chart.yaml").read_text())["appVersion"]
        di = f"{SITE}/kubetune-{version}.dist-info"
        _add_bytes(
            tar, f"{di}/METADATA", f"Metadata-Version: 2.1\nName: kubetune\nVersion: {version}\n".encode()
        )
        _add_bytes(tar, f"{di}/entry_points.txt", b"[console_scripts]\nkubetune = kubetune.cli.main:main\n")

    return _cached_layer(key, write)


def pause_layer() -> Path:
    pause = ensure("pause")["pause"]
    key = "pause-" + _file_sha(pause)[:16]
    return _cached_layer(key, lambda tar: tar.add(pause, arcname="pause", filter=_owned_by_root))


# -- images ------------------------------------------------------------------------------


@dataclass
class Image:
    name: str
    layers: list[Path]
    config: dict[str, object]
    blobs: dict[str, Path | bytes] = field(default_factory=dict)

    def _layer_digest(self, layer: Path) -> str:
        memo = layer.with_suffix(".sha256")
        if not memo.exists() or memo.stat().st_mtime < layer.stat().st_mtime:
            memo.write_text(_file_sha(layer))
        return memo.read_text().strip()

    def manifest(self) -> tuple[str, bytes]:
        """(manifest digest, index.json); fills self.blobs with every blob of the layout."""
        digests = [self._layer_digest(layer) for layer in self.layers]
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": self.config,
                "rootfs": {"type": "layers", "diff_ids": [f"sha256:{d}" for d in digests]},
            },
            sort_keys=True,
        ).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": f"sha256:{_sha(config)}",
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": f"sha256:{d}",
                        "size": layer.stat().st_size,
                    }
                    for d, layer in zip(digests, self.layers, strict=True)
                ],
            },
            sort_keys=True,
        ).encode()
        self.blobs = {_sha(config): config, _sha(manifest): manifest}
        self.blobs.update(zip(digests, self.layers, strict=True))
        index = json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": f"sha256:{_sha(manifest)}",
                        "size": len(manifest),
                        "annotations": {
                            "io.containerd.image.name": self.name,
                            "org.opencontainers.image.ref.name": self.name,
                        },
                    }
                ],
            }
        ).encode()
        return f"sha256:{_sha(manifest)}", index

    def write_archive(self, out: IO[bytes], skip: Container[str] = ()) -> int:
        """The OCI image layout as a tar stream (what `ctr images import` reads). Layer blobs whose
        digest is in `skip` (already in containerd's content store) are left out: the import finds
        them in the store, so only new layers are streamed. Returns the bytes of blobs written."""
        _, index = self.manifest()
        sent = 0
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
            _add_bytes(tar, "index.json", index)
            _add_dir(tar, "blobs")
            _add_dir(tar, "blobs/sha256")
            for digest, blob in self.blobs.items():
                if isinstance(blob, bytes):
                    _add_bytes(tar, f"blobs/sha256/{digest}", blob)
                elif f"sha256:{digest}" not in skip:
                    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
                    info.size, info.mode = blob.stat().st_size, 0o644
                    with open(blob, "rb") as f:
                        tar.addfile(info, f)
                    sent += info.size
        return sent


DOCKERFILE_BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# (Dockerfile, the build argument naming its base)
DOCKERFILES = {
    "operator": ("operator_image/Dockerfile", "PYTHON_IMAGE"),
    "trainer": ("trainer_image/Dockerfile", "CUDA_IMAGE"),
}


def _log(msg: str) -> None:
    print(f"images: {msg}", file=sys.stderr, flush=True)


# -- buildah ------------------------------------------------------------------------------------


def dockerfiles_dir() -> Path:
    d = images_dir() / "dockerfiles"
    d.mkdir(parents=True, exist_ok=True)
    return d


def buildah_argv() -> list[str]:
    """buildah with its storage in the cache (so CI keeps its layer cache with the rest of the cache)."""
    if not shutil.which("buildah"):
        raise RuntimeError("buildah not found: apt-get install buildah (see e2e/README.md)")
    d = dockerfiles_dir() / "buildah"
    return [
        "buildah",
        "--root",
        str(d / "storage"),
        "--runroot",
        str(d / "run"),
        "--storage-driver",
        "overlay",
    ]


class BuildFailed(RuntimeError):
    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(msg)
        self.kind = kind


def _buildah(*args: str, quiet: bool = False) -> str:
    r = subprocess.run(
        [*buildah_argv(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if not quiet else subprocess.PIPE,
        text=True,
        env={**os.environ, "BUILDAH_ISOLATION": "chroot"},
    )
    if r.returncode != 0:
        tail = "\n".join((r.stdout + (r.stderr or "")).splitlines()[-30:])
        raise RuntimeError(f"buildah {' '.join(args[:2])} failed (exit {r.returncode}):\n{tail}")
    return r.stdout


def _has_image(name: str) -> bool:
    r = subprocess.run([*buildah_argv(), "inspect", "--type", "image", name], capture_output=True)
    return r.returncode == 0


def base_image() -> str:
    """The Debian base as a buildah image, named by the content key of its rootfs tar."""
    tar = base_layer(DOCKERFILE_BASE_PACKAGES, dockerfiles_dir())
    name = f"kubetune.local/debian-base:{tar.stem.removeprefix('base-')}"
    if not _has_image(name):
        c = _buildah("from", "--pull=never", "scratch", quiet=True).strip()
        try:
            _buildah("add", c, str(tar), "/", quiet=True)
            _buildah(
                "config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", c
            )
            _buildah("commit", "--quiet", c, name, quiet=True)
        finally:
            subprocess.run([*buildah_argv(), "rm", c], capture_output=True)
    return name


def wheelhouse(kinds: Sequence[str] = ("operator", "trainer")) -> Path:
    """Wheels of every requirement of both images (the constraints' versions), made by `pip wheel` from pip's
    cache (what `make install` downloaded; an sdist such as DeepSpeed's is built once). The Dockerfiles' pip
    steps read it offline (--no-index --find-links); it is needed only when a dependency layer is not in
    buildah's layer cache, and removed after the build (GBs)."""
    reqs = subprocess.run(
        [sys.executable, str(REPO / ".ci" / "requirements.py"), *kinds],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    reqs += [_dockerfile_arg(DOCKERFILES["trainer"][0], "TORCH")] if "trainer" in kinds else []
    reqs.append("setuptools>=77")
    out = dockerfiles_dir() / "wheels"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "-w",
            str(out),
            "-c",
            str(REPO / ".ci" / "constraints.txt"),
            *reqs,
        ],
        check=True,
        env={**os.environ, "DS_BUILD_OPS": "0"},
    )
    _log(f"wheelhouse of {len(list(out.glob('*.whl')))} wheels filled in {time.monotonic() - t0:.0f}s")
    return out


def _dockerfile_arg(dockerfile: str, name: str) -> str:
    for line in (REPO / dockerfile).read_text().splitlines():
        if line.startswith(f"ARG {name}="):
            return line.split("=", 1)[1].strip()
    raise KeyError(f"{dockerfile} has no ARG {name}=...")


def build_dockerfile(kind: str, name: str, base: str, wheels: Path) -> LayoutImage:
    """`buildah build` of one Dockerfile on `base`, pushed uncompressed into the cache's OCI layout."""
    dockerfile, base_arg = DOCKERFILES[kind]
    t0 = time.monotonic()
    try:
        _buildah(
            "build",
            "--layers",
            "--force-rm",
            "--pull=never",
            "--isolation=chroot",
            "--network=host",
            "--quiet",
            f"--file={REPO / dockerfile}",
            f"--tag={name}",
            f"--build-arg={base_arg}={base}",
            "--build-arg=WHEELS=/wheels",
            f"--volume={wheels}:/wheels:ro",
            str(REPO),
        )
    except RuntimeError as e:
        raise BuildFailed(kind, f"{dockerfile}: {e}") from None
    layout = dockerfiles_dir() / "oci"
    _buildah("push", "--quiet", "--disable-compression", name, f"oci:{layout}:{kind}")
    _log(f"{kind} image built from {dockerfile} in {time.monotonic() - t0:.0f}s")
    return LayoutImage(name, layout, kind)


class LayoutImage(Image):
    """The image an OCI layout holds under `ref` (what `buildah push oci:<layout>:<ref>` wrote)."""

    def __init__(self, name: str, layout: Path, ref: str) -> None:
        super().__init__(name, [], {})
        self.layout, self.ref = layout, ref

    def manifest(self) -> tuple[str, bytes]:
        index = json.loads((self.layout / "index.json").read_text())
        entry = next(
            m
            for m in index["manifests"]
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == self.ref
        )
        blob = self.layout / "blobs" / "sha256"
        digest = entry["digest"].removeprefix("sha256:")
        manifest = json.loads((blob / digest).read_text())
        config = manifest["config"]["digest"].removeprefix("sha256:")
        layers = [m["digest"].removeprefix("sha256:") for m in manifest["layers"]]
        self.blobs = {d: blob / d for d in (digest, config, *layers)}
        named = {
            **entry,
            "annotations": {
                "io.containerd.image.name": self.name,
                "org.opencontainers.image.ref.name": self.name,
            },
        }
        return f"sha256:{digest}", json.dumps({"schemaVersion": 2, "manifests": [named]}).encode()


def build_dockerfiles(kinds: Sequence[str] = ("operator", "trainer")) -> list[Image]:
    """operator_image/Dockerfile and trainer_image/Dockerfile (or those of `kinds`) built by buildah (all of
    KUBETUNE_E2E_IMAGES=dockerfiles; the operator's alone: e2e/test_dockerfiles.py)."""
    with open(dockerfiles_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one buildah builder per cache (the background prebuild, a test)
        return _build_dockerfiles(kinds)


def _build_dockerfiles(kinds: Sequence[str]) -> list[Image]:
    t0 = time.monotonic()
    names = dict(zip(("operator", "trainer"), chart_images(), strict=True))
    base = base_image()
    # First with no wheels: every dependency layer found in buildah's layer cache (a warm run) needs none.
    # A pip step that has to run fails at once (--no-index), and the build is retried with the wheelhouse.
    empty = dockerfiles_dir() / "no-wheels"
    empty.mkdir(exist_ok=True)
    try:
        built = [build_dockerfile(kind, names[kind], base, empty) for kind in kinds]
    except BuildFailed as e:
        _log(f"{e.kind}: a dependency layer is not cached, building it from the wheelhouse")
        wheels = wheelhouse(kinds)
        try:
            built = [build_dockerfile(kind, names[kind], base, wheels) for kind in kinds]
        finally:
            shutil.rmtree(wheels, ignore_errors=True)
    used = set()
    for image in built:
        image.manifest()  # fills image.blobs from the layout
        used |= set(image.blobs)
    for ref in set(DOCKERFILES) - set(kinds):  # the other image's blobs stay
        if _has_image(names[ref]):
            other = LayoutImage(names[ref], dockerfiles_dir() / "oci", ref)
            try:
                other.manifest()
                used |= set(other.blobs)
            except (StopIteration, OSError):
                pass
    for blob in (dockerfiles_dir() / "oci" / "blobs" / "sha256").iterdir():  # older builds' blobs: GBs each
        if blob.name not in used:
            blob.unlink()
    _log(f"{' and '.join(kinds)} image built from the Dockerfile in {time.monotonic() - t0:.0f}s")
    return list(built)


@contextmanager
def _builder_lock() -> Iterator[None]:
    """One builder at a time per cache (a background prebuild and a test session may overlap)."""
    with open(images_dir() / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def build_all(pause: bool = True) -> list[Image]:
    """The pause, operator and trainer images (layers built or taken from the cache). `pause=False`
    (the prebuild): only the operator and trainer images, which need no Go binary."""
    with _builder_lock():
        return _build_all(pause)


def build_pause() -> list[Image]:
    """The pause image alone (a few MB: for a node that runs only pause containers)."""
    with _builder_lock():
        return [pause_image()]


def pause_image() -> Image:
    return Image(PAUSE_IMAGE, [pause_layer()], {"Entrypoint": ["/pause"]})


def _build_all(pause: bool) -> list[Image]:
    if os.environ.get("KUBETUNE_E2E_IMAGES", "assembled") == "dockerfiles":
        return ([pause_image()] if pause else []) + build_dockerfiles()
    t0 = time.monotonic()
    op_name, trainer_name = chart_images()
    base = base_layer()
    scripts = {
        "kubetune": f"#!/{VENV}/bin/python\nimport sys\nfrom kubetune.cli.main import main\nsys.exit(main())\n"
    }
    app = app_layer(base, scripts)
    env = [f"PATH={PATH}", f"VIRTUAL_ENV=/{VENV}", "PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1"]
    images = [pause_image()] if pause else []
    images += [
        Image(
            op_name,
            [base, *deps_layers(["kubetune[operator]"]), app],
            {
                "User": "1000:1000",
                "Env": env,
                "Entrypoint": ["kubetune"],
                "Cmd": ["operator", "--all-namespaces"],
                "WorkingDir": "/tmp",
                "ExposedPorts": {"8080/tcp": {}},
            },
        ),
        Image(
            trainer_name,
            [base, *deps_layers(["kubetune[trainer]", "pyarrow"]), app],
            {
                "User": "1000:1000",
                "Env": [
                    *env,
                    "HF_HOME=/var/cache/kubetune/huggingface",
                    "KUBETUNE_CACHE_DIR=/var/cache/kubetune",
                ],
                "Entrypoint": ["python", "-m", "kubetune_trainer.launch"],
                "WorkingDir": "/home/kubetune",
                "ExposedPorts": {"8080/tcp": {}},
            },
        ),
    ]
    for image in images:
        image.manifest()  # layer digests memoised beside the layers (seconds per GB)
    used = {p.with_suffix("") for i in images for p in i.layers}
    for stale in (images_dir() / "layers").iterdir() if pause else ():  # layers of older contents: GBs each
        if stale.with_suffix("") not in used and stale.suffix in (".tar", ".sha256"):
            stale.unlink()
    print(f"images: layers ready in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    return images


def _ctr(ctr: Sequence[str], *args: str) -> str:
    return subprocess.run([*ctr, "-n", "k8s.io", *args], check=True, capture_output=True, text=True).stdout


def _image_refs(ctr: Sequence[str]) -> dict[str, str]:
    """{image ref: manifest digest} in containerd's k8s.io namespace (names and the CRI's sha256: ids)."""
    lines = _ctr(ctr, "images", "ls").splitlines()[1:]
    return {line.split()[0]: line.split()[2] for line in lines if line.strip()}


def _import(image: Image, ctr: Sequence[str], skip: Container[str]) -> tuple[int, str]:
    p = subprocess.Popen(
        [*ctr, "-n", "k8s.io", "images", "import", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert p.stdin is not None and p.stdout is not None
    try:
        sent = image.write_archive(p.stdin, skip)
    except BrokenPipeError:
        sent = -1
    finally:
        try:
            p.stdin.close()
        except BrokenPipeError:
            pass
    out = p.stdout.read().decode()
    return (sent if p.wait() == 0 and sent >= 0 else -1), out


def import_all(images: Sequence[Image], ctr: Sequence[str]) -> None:
    """Import each image into containerd (namespace k8s.io) unless it is there with the same manifest.

    Only blobs missing from the content store are streamed (after a source change: the app
    layer, not the 4.7 GB venv layer); containerd takes the others from its store and unpacks
    only the new layers on top of the existing snapshots. Then `prune` drops older versions."""
    have = _image_refs(ctr)
    for image in images:
        digest, _ = image.manifest()
        if have.get(image.name) == digest:
            continue
        t0 = time.monotonic()
        present = set(_ctr(ctr, "content", "ls", "-q").split())
        sent, out = _import(image, ctr, present)
        if sent < 0 and present:  # e.g. a blob collected in between: send everything
            sent, out = _import(image, ctr, ())
        if sent < 0:
            raise RuntimeError(f"ctr images import {image.name} failed:\n{out}")
        print(
            f"images: imported {image.name} in {time.monotonic() - t0:.0f}s ({sent / 2**20:.0f} MiB streamed)",
            file=sys.stderr,
        )
    prune(images, ctr)


def prune(images: Sequence[Image], ctr: Sequence[str]) -> list[str]:
    """Remove every image ref that does not point at one of `images`' manifests (older versions,
    and the CRI's `sha256:<config>` ids of them), then collect their blobs and snapshots
    (`ctr images rm --sync` runs containerd's garbage collector). Returns the removed refs."""
    keep = {image.manifest()[0] for image in images}
    stale = sorted(ref for ref, digest in _image_refs(ctr).items() if digest not in keep)
    if stale:
        t0 = time.monotonic()
        _ctr(ctr, "images", "rm", "--sync", *stale)
        print(f"images: pruned {len(stale)} old image refs in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    return stale


if __name__ == "__main__":
    # `cd e2e && ../.venv/bin/python -m harness.images [--prebuild]`: build (or find) the layers and print them.
    # --prebuild: the operator and trainer images only, no Go binary needed (.ci/run runs it in the
    # background while the unit tests run, so the real node's first start finds the layers built), then the
    # operator's Dockerfile built by buildah.
    prebuild = "--prebuild" in sys.argv[1:]
    for img in build_all(pause=not prebuild):
        print(img.name, [str(p) for p in img.layers])
    if prebuild and os.environ.get("KUBETUNE_E2E_IMAGES") != "dockerfiles" and shutil.which("buildah"):
        # and operator_image/Dockerfile, built by buildah, which e2e/test_dockerfiles.py runs
        for img in build_dockerfiles(("operator",)):
            print(img.name, img.manifest()[0])
