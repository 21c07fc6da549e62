"""The operator, trainer and pause images for the real-kubelet mode: the Dockerfiles, built with no daemon and no pull.

    images = build_all()             # pause + operator_image/Dockerfile + trainer_image/Dockerfile (buildah, cached)
    import_all(images, ctr_argv)     # `ctr -n k8s.io images import -` of each changed image (new
                                     # blobs only), then prune of older versions

operator_image/Dockerfile and trainer_image/Dockerfile are built by buildah (chroot isolation, the host's
network: nothing on the host's network changes; layer cache in <cache>/images/dockerfiles/buildah), each on a
base given as its base build argument, since no image registry is reachable here:

* operator (`PYTHON_IMAGE`, python:3.11-slim by default): a Debian bookworm minbase + python3 + python3-venv
  root filesystem made by `mmdebstrap`;
* trainer (`BASE`, the public PyTorch image by default, which carries torch): a stand-in for it,
  `kubetune.local/trainer-base-standin:<key>`, made of the Debian minbase + python3 (mmdebstrap), torch and its
  CUDA wheels and Triton copied from the running venv (the versions .ci/constraints.txt pins; torch is not
  downloaded again) and a .pth that puts them on python3's path. The Dockerfile adds the compiler, headers and
  venv module the stand-in lacks, a venv that sees the base's torch, and kubetune's other dependencies.

Their pip steps read a wheelhouse that `pip wheel` fills from pip's cache (--no-index --find-links) when a
dependency layer is not in buildah's layer cache. Each image is pushed uncompressed into an OCI layout under the
cache and imported from there (new blobs only). The names are the chart's defaults (charts/kubetune/values.yaml),
so `helm install` with default values runs these images.
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
from typing import IO, Any

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


def _cached_layer(key: str, write: Callable[[tarfile.TarFile], None], where: Path | None = None) -> Path:
    """<where, default <images>/layers>/<key>.tar, written once by `write` (an uncompressed layer tar)."""
    out = (where or images_dir() / "layers") / f"{key}.tar"
    out.parent.mkdir(parents=True, exist_ok=True)
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


def standin_layers() -> list[Path]:
    """The trainer base's stand-in layers over the Debian base: torch + nvidia-* (~4 GB, the versions the
    constraints pin, copied from the running venv, so torch is not downloaded again), Triton, and a .pth that
    puts them on the base python3's path (as the public PyTorch image's python has torch). The torch layer's
    key and contents are those of the harness's earlier assembled trainer image, so a cache that holds it
    (layer tar, containerd blob and snapshot) is reused as it is."""
    site = Path(sysconfig.get_paths()["purelib"])
    dists = _closure(["kubetune[trainer]", "pyarrow"])
    heavy = [d for d in dists if _heavy(d)]
    heavy_tops = {t for d in heavy for t in _top_levels(d)}
    triton = metadata.distribution("triton")
    # what `import torch` needs besides (typing-extensions, sympy, filelock, ...): the public image has it too
    torch_deps = [d for d in _closure(["torch"]) if not _heavy(d)]

    def key(kind: str, ds: Sequence[metadata.Distribution]) -> str:
        ident = [f"{d.metadata['Name']}=={d.version}" for d in ds]
        # not the venv's path: a fresh checkout's venv (a new CI clone) holds the same files
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

    def write_triton(tar: tarfile.TarFile) -> None:
        skeleton(tar)
        add_tops(tar, _top_levels(triton))

    def write_torch_deps(tar: tarfile.TarFile) -> None:
        skeleton(tar)
        add_tops(tar, {t for d in torch_deps for t in _top_levels(d)} - heavy_tops)

    def write_pth(tar: tarfile.TarFile) -> None:
        for d in ("usr", "usr/lib", "usr/lib/python3", "usr/lib/python3/dist-packages"):
            _add_dir(tar, d)
        _add_bytes(tar, "usr/lib/python3/dist-packages/kubetune-standin-torch.pth", f"/{SITE}\n".encode())

    # the torch layer where the harness's earlier assembled images kept it (a cache that has it keeps it); the
    # others beside the Dockerfile builds
    mine = dockerfiles_dir() / "layers"
    return [
        _cached_layer(key("torch", heavy), write_heavy),
        _cached_layer(key("triton", [triton]), write_triton, mine),
        _cached_layer(key("torchdeps", torch_deps), write_torch_deps, mine),
        _cached_layer("standin-pth-" + _sha(SITE.encode())[:16], write_pth, mine),
    ]


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
    history: list[dict[str, str]] = field(
        default_factory=list
    )  # one entry per layer (buildah needs it of a base)

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
                **({"history": self.history} if self.history else {}),
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
    "trainer": ("trainer_image/Dockerfile", "BASE"),
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


def _buildah_env() -> dict[str, str]:
    # buildah's temporary copies (a pulled layer is staged before it is applied: GBs) stay in the cache's
    # file system, not /var/tmp
    tmp = dockerfiles_dir() / "tmp"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "BUILDAH_ISOLATION": "chroot", "TMPDIR": str(tmp)}


def _buildah(*args: str, quiet: bool = False) -> str:
    r = subprocess.run(
        [*buildah_argv(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if not quiet else subprocess.PIPE,
        text=True,
        env=_buildah_env(),
    )
    if r.returncode != 0:
        tail = "\n".join((r.stdout + (r.stderr or "")).splitlines()[-30:])
        raise RuntimeError(f"buildah {' '.join(args[:2])} failed (exit {r.returncode}):\n{tail}")
    return r.stdout


def _has_image(name: str) -> bool:
    r = subprocess.run([*buildah_argv(), "inspect", "--type", "image", name], capture_output=True)
    return r.returncode == 0


def base_image() -> str:
    """The operator's base: Debian + python3 + python3-venv as a buildah image, named by its rootfs tar's key."""
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


TRAINER_PUBLIC_BASE = "pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime"


def standin_image() -> Image:
    """The stand-in for trainer_image/Dockerfile's public base (a PyTorch image: a python3 that imports torch),
    which no registry here can serve: the Debian base (python3) + torch and its CUDA wheels + Triton from the
    running venv + a .pth putting them on python3's path. Only its layers are the harness's; what the e2e node
    runs is the Dockerfile built on it."""
    layers = [base_layer(), *standin_layers()]
    history = [
        {"created_by": f"mmdebstrap --variant=minbase --include={','.join(BASE_PACKAGES)} {DEBIAN_SUITE}"},
        {"created_by": "torch and its CUDA wheels (nvidia-*) from the test venv"},
        {"created_by": "triton from the test venv"},
        {"created_by": "torch's other requirements (sympy, typing-extensions, ...) from the test venv"},
        {"created_by": f"/usr/lib/python3/dist-packages/kubetune-standin-torch.pth: /{SITE}"},
    ]
    key = _sha(json.dumps([[p.name for p in layers], history]).encode())[:16]
    return Image(
        f"kubetune.local/trainer-base-standin:{key}",
        layers,
        {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Labels": {"io.kubetune.stands-in-for": TRAINER_PUBLIC_BASE},
        },
        history=history,
    )


def _seed_layout(image: Image, layout: Path) -> None:
    """Hard links to the image's layer tars in an OCI layout's blobs (no copy: the same file system), so a
    push or pull of a layer with that digest finds it there instead of writing gigabytes again."""
    image.manifest()
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for digest, blob in image.blobs.items():
        dest = blobs / digest
        if dest.exists():
            continue
        if isinstance(blob, bytes):
            dest.write_bytes(blob)
        else:
            os.link(blob, dest)
    if not (layout / "oci-layout").exists():
        (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def standin_base() -> str:
    """The stand-in, pulled into buildah's storage from an OCI layout of hard links (once per content)."""
    image = standin_image()
    if _has_image(image.name):
        return image.name
    t0 = time.monotonic()
    layout = dockerfiles_dir() / "standin-oci"
    shutil.rmtree(layout, ignore_errors=True)
    _seed_layout(image, layout)
    _, index = image.manifest()
    entry = json.loads(index)["manifests"][0]
    entry["annotations"] = {"org.opencontainers.image.ref.name": "standin"}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    # buildah names an image pulled from a layout after the layout's path, which must then be a valid image
    # name (the cache's `.cache` is not): pulled through a symbolic link with a plain name
    link = Path("/tmp") / f"kubetune-standin-oci-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(layout)
    try:
        image_id = _buildah("pull", "--quiet", f"oci:{link}:standin", quiet=True).strip().splitlines()[-1]
        _buildah("tag", image_id, image.name, quiet=True)
        _buildah("rmi", f"localhost{link}:latest", quiet=True)  # the name the pull gave it (untagged only)
    finally:
        link.unlink(missing_ok=True)
        shutil.rmtree(layout, ignore_errors=True)
    _log(f"trainer base stand-in {image.name} pulled into buildah in {time.monotonic() - t0:.0f}s")
    return image.name


def wheelhouse(kinds: Sequence[str] = ("operator", "trainer")) -> Path:
    """Wheels of what the images' pip steps install: the installed closure of kubetune[<kind>] (the constraints'
    versions), without torch, its CUDA wheels and Triton (the trainer's base carries them), made by
    `pip wheel --no-deps` from pip's cache (an sdist such as DeepSpeed's is built once). The Dockerfiles' pip
    steps read it offline (--no-index --find-links); it is needed only when a dependency layer is not in
    buildah's layer cache, and removed after the build."""
    dists = {d.metadata["Name"]: d.version for kind in kinds for d in _closure([f"kubetune[{kind}]"])}
    dists = {n: v for n, v in dists.items() if n.lower() != "triton" and not _heavy(metadata.distribution(n))}
    dists.pop("setuptools", None)  # the venv's is older than what the Dockerfiles build the package with
    out = dockerfiles_dir() / "wheels"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out)]
        + [f"{n}=={v}" for n, v in sorted(dists.items())]
        + [_setuptools()],
        check=True,
        env={**os.environ, "DS_BUILD_OPS": "0"},
    )
    _log(f"wheelhouse of {len(list(out.glob('*.whl')))} wheels filled in {time.monotonic() - t0:.0f}s")
    return out


def _setuptools() -> str:
    """The setuptools the Dockerfiles build kubetune with (pyproject.toml's build requirement, >= 77) within what
    torch accepts (torch 2.11 requires setuptools < 82)."""
    spec = [
        str(Requirement(r).specifier)
        for r in metadata.requires("torch") or []
        if Requirement(r).name == "setuptools"
    ]
    return ",".join(["setuptools>=77", *filter(None, spec)])


def context_key(kind: str, base: str) -> str:
    """What a build of `kind` depends on: its Dockerfile, the base's name (content-keyed), and every file of the
    build context that .dockerignore lets in."""
    dockerfile, _ = DOCKERFILES[kind]
    allowed = [
        line[1:].strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!") and line[1:].strip()
    ]
    files = sorted(
        p
        for a in allowed
        for p in ([REPO / a] if (REPO / a).is_file() else (REPO / a).rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )
    h = hashlib.sha256(json.dumps([kind, base, (REPO / dockerfile).read_text()]).encode())
    for p in files:
        h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:32]


def _built(kind: str, name: str, key: str) -> LayoutImage | None:
    """The layout's image of `kind` if it was built from this context: its stamp holds the context key and the
    manifest digest pushed then, and the layout still holds that manifest whole (another checkout sharing the
    cache may have pushed its own build since)."""
    layout = dockerfiles_dir() / "oci"
    stamp = layout / f"{kind}.key"
    if not stamp.exists() or stamp.read_text().split()[:1] != [key]:
        return None
    image = LayoutImage(name, layout, kind)
    try:
        digest = image.manifest()[0]
    except (StopIteration, OSError, ValueError):
        return None
    if stamp.read_text().split()[1:] != [digest]:
        return None
    return image if all(isinstance(b, bytes) or b.exists() for b in image.blobs.values()) else None


def build_dockerfile(kind: str, name: str, base: str, wheels: Path) -> LayoutImage:
    """`buildah build` of one Dockerfile on `base`, pushed uncompressed into the cache's OCI layout; skipped when
    the layout holds the build of the same context (a warm run: no buildah build at all)."""
    dockerfile, base_arg = DOCKERFILES[kind]
    key = context_key(kind, base)
    done = _built(kind, name, key)
    if done is not None:
        return done
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
    if kind == "trainer":  # the stand-in's layers (GBs) are hard links, not copies, in the layout
        _seed_layout(standin_image(), layout)
    (layout / f"{kind}.key").unlink(missing_ok=True)
    _buildah("push", "--quiet", "--disable-compression", name, f"oci:{layout}:{kind}")
    image = LayoutImage(name, layout, kind)
    (layout / f"{kind}.key").write_text(f"{context_key(kind, base)} {image.manifest()[0]}")
    _log(f"{kind} image built from {dockerfile} in {time.monotonic() - t0:.0f}s")
    return image


class LayoutImage(Image):
    """The image an OCI layout holds under `ref` (what `buildah push oci:<layout>:<ref>` wrote)."""

    def __init__(self, name: str, layout: Path, ref: str) -> None:
        super().__init__(name, [], {})
        self.layout, self.ref = layout, ref
        self.config_digest = ""

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
        config = self.config_digest = manifest["config"]["digest"].removeprefix("sha256:")
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

    def image_config(self) -> dict[str, Any]:
        """The image's OCI config: its config, labels and history (what buildah recorded from the Dockerfile)."""
        self.manifest()
        return dict(json.loads((self.layout / "blobs" / "sha256" / self.config_digest).read_text()))


def build_dockerfiles(kinds: Sequence[str] = ("operator", "trainer")) -> list[Image]:
    """operator_image/Dockerfile and trainer_image/Dockerfile (or those of `kinds`) built by buildah: the
    images the e2e node runs (build_all)."""
    with open(dockerfiles_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one buildah builder per cache (the background prebuild, a test)
        return _build_dockerfiles(kinds)


def _build_dockerfiles(kinds: Sequence[str]) -> list[Image]:
    t0 = time.monotonic()
    names = dict(zip(("operator", "trainer"), chart_images(), strict=True))
    bases = {"operator": base_image, "trainer": standin_base}
    base = {kind: bases[kind]() for kind in kinds}
    # First with no wheels: every dependency layer found in buildah's layer cache (a warm run) needs none.
    # A pip step that has to run fails at once (--no-index), and the build is retried with the wheelhouse.
    empty = dockerfiles_dir() / "no-wheels"
    empty.mkdir(exist_ok=True)
    try:
        built = [build_dockerfile(kind, names[kind], base[kind], empty) for kind in kinds]
    except BuildFailed as e:
        _log(f"{e.kind}: a dependency layer is not cached, building it from the wheelhouse")
        wheels = wheelhouse(kinds)
        try:
            built = [build_dockerfile(kind, names[kind], base[kind], wheels) for kind in kinds]
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
    """The images the e2e node runs: the pause image and operator_image/Dockerfile's and
    trainer_image/Dockerfile's builds (buildah, layer cache). `pause=False` (the prebuild): no Go binary needed."""
    with _builder_lock():
        images = [pause_image()] if pause else []
        t0 = time.monotonic()
        images += build_dockerfiles()
        _log(f"images ready in {time.monotonic() - t0:.0f}s")
        return images


def build_pause() -> list[Image]:
    """The pause image alone (a few MB: for a node that runs only pause containers)."""
    with _builder_lock():
        return [pause_image()]


def pause_image() -> Image:
    return Image(PAUSE_IMAGE, [pause_layer()], {"Entrypoint": ["/pause"]})


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
    # `cd e2e && ../.venv/bin/python -m harness.images [--prebuild]`: build (or find) the images and print them.
    # --prebuild: the operator and trainer images only, no Go binary needed (.ci/run runs it in the
    # background while the unit tests run, so the real node's first start finds them built).
    for img in build_all(pause="--prebuild" not in sys.argv[1:]):
        print(img.name, img.manifest()[0])
