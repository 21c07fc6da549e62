"""S3 transfer: model download and artifact upload MB/s, kubetune's storage code vs plain single-stream boto3.

kubetune: trainer_image/kubetune_trainer/storage.py as the trainer uses it -- `fetch("s3://...")` for the model
(list the prefix, every key through one s3transfer TransferManager into the node cache) and `OutputStore.put_files`
for artifacts (one TransferManager for the whole directory: files in parallel, each multipart).
Baseline: one boto3 client, `upload_file` / `download_file` with multipart disabled (threshold above the file size,
no threads): a single PUT / GET stream per file.

The server is a loopback S3 from the e2e harness (e2e/harness/s3.py): MinIO when its binary has been built
(e2e/harness/build.sh), else moto's server process (--server moto), or moto's ThreadedMotoServer in this process
(--server threaded-moto; it shares this process's GIL, so it understates everything). Loopback figures say how much
the client-side transfer settings matter; they are not WAN or AWS figures.

    python bench/s3_transfer.py                 # 256 MB in 4 files, 2 repetitions, best of each
    python bench/s3_transfer.py --mb 32 --reps 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO, REPO / "operator", REPO / "trainer_image"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))


class ThreadedMoto:
    """moto's in-process server, shaped like the harness's S3Server."""

    def __init__(self, bucket: str) -> None:
        self.bucket, self.kind, self.region = bucket, "threaded-moto", "us-east-1"

    def start(self) -> ThreadedMoto:
        from moto.server import ThreadedMotoServer

        from e2e.harness.procs import free_port

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.client().create_bucket(Bucket=self.bucket)
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_DEFAULT_REGION": self.region, "AWS_REGION": self.region}  # fmt: skip

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region, aws_access_key_id="bench",
                            aws_secret_access_key="bench", config=Config(s3={"addressing_style": "path"}))  # fmt: skip

    def stop(self) -> None:
        self.server.stop()


def start_server(kind: str, workdir: Path, bucket: str) -> Any:
    from e2e.harness import binaries
    from e2e.harness.s3 import S3Server

    if kind == "auto":
        kind = "minio" if os.access(binaries._paths()["minio"], os.X_OK) else "moto"
    if kind == "threaded-moto":
        return ThreadedMoto(bucket).start()
    return S3Server(workdir / "s3", bucket=bucket, kind=kind).start()


def single_stream_config(size: int) -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=size + 1, multipart_chunksize=size + 1, use_threads=False, max_concurrency=1
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=256, help="total bytes moved each way, in MB (default 256)")
    ap.add_argument(
        "--files", type=int, default=4, help="split into this many files, like model shards (default 4)"
    )
    ap.add_argument(
        "--reps", type=int, default=2, help="repetitions; the best of each is reported (default 2)"
    )
    ap.add_argument("--server", default="auto", choices=["auto", "minio", "moto", "threaded-moto"])
    ap.add_argument("--out", help="also write the figures as JSON here")
    a = ap.parse_args(argv)

    from kubetune.api.contract import ExitCode
    from kubetune.api.models import StorageSpec
    from kubetune_trainer import storage

    bucket = "kubetune-bench"
    with tempfile.TemporaryDirectory(prefix="kubetune-s3bench-") as tmp:
        work = Path(tmp)
        server = start_server(a.server, work, bucket)
        try:
            os.environ.update(server.env())
            spec = StorageSpec(endpoint=server.endpoint, region=server.region, path_style=True)
            client = server.client()
            src = work / "src"
            src.mkdir()
            per_file = a.mb * 2**20 // a.files
            names = [f"model-{i:05d}-of-{a.files:05d}.safetensors" for i in range(a.files)]
            for name in names:
                with open(src / name, "wb") as handle:
                    for _ in range(per_file // 2**20):
                        handle.write(os.urandom(2**20))
                    handle.write(os.urandom(per_file % 2**20))
            total = per_file * a.files
            single = single_stream_config(per_file)
            times: dict[str, list[float]] = {
                k: []
                for k in ("kubetune_upload", "baseline_upload", "kubetune_download", "baseline_download")
            }
            for rep in range(a.reps):
                # Artifact upload: OutputStore.put_files, as checkpoint.upload_files calls it for a whole directory.
                store = storage.OutputStore(f"s3://{bucket}/kt-{rep}", spec)
                t = time.perf_counter()
                store.put_files([(src / name, f"model/{name}") for name in names])
                times["kubetune_upload"].append(time.perf_counter() - t)
                t = time.perf_counter()
                for name in names:
                    client.upload_file(str(src / name), bucket, f"plain-{rep}/model/{name}", Config=single)
                times["baseline_upload"].append(time.perf_counter() - t)

                # Model download: fetch() of the prefix into a fresh node cache, as model.model_path does.
                os.environ["KUBETUNE_CACHE_DIR"] = str(work / f"cache-{rep}")
                t = time.perf_counter()
                got = storage.fetch(
                    f"s3://{bucket}/plain-{rep}/model", spec, "spec.model.source", ExitCode.MODEL_NOT_FOUND
                )
                times["kubetune_download"].append(time.perf_counter() - t)
                assert sorted(p.name for p in got.iterdir() if not p.name.startswith(".")) == names, list(
                    got.iterdir()
                )
                dest = work / f"plain-dl-{rep}"
                dest.mkdir()
                t = time.perf_counter()
                for name in names:
                    client.download_file(bucket, f"kt-{rep}/model/{name}", str(dest / name), Config=single)
                times["baseline_download"].append(time.perf_counter() - t)
                assert (dest / names[0]).stat().st_size == per_file
                shutil.rmtree(dest)
                shutil.rmtree(work / f"cache-{rep}")
                for prefix in (f"kt-{rep}/", f"plain-{rep}/"):
                    keys = storage.s3_list(client, bucket, prefix)
                    client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys]})
        finally:
            server.stop()

    mbps = {k: total / 2**20 / min(v) for k, v in times.items()}
    result = {
        "server": server.kind, "total_mb": total / 2**20, "files": a.files, "reps": a.reps,
        "upload_mb_s": mbps["kubetune_upload"], "baseline_upload_mb_s": mbps["baseline_upload"],
        "upload_ratio": mbps["kubetune_upload"] / mbps["baseline_upload"],
        "download_mb_s": mbps["kubetune_download"], "baseline_download_mb_s": mbps["baseline_download"],
        "download_ratio": mbps["kubetune_download"] / mbps["baseline_download"],
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "median_mb_s": {k: total / 2**20 / statistics.median(v) for k, v in times.items()},
    }  # fmt: skip
    print(f"server {result['server']}, {result['total_mb']:.0f} MB in {a.files} files, best of {a.reps}")
    print(f"{'':<10} {'kubetune MB/s':>14} {'single-stream MB/s':>19} {'ratio':>7}")
    for what in ("upload", "download"):
        print(
            f"{what:<10} {result[what + '_mb_s']:>14.1f} {result['baseline_' + what + '_mb_s']:>19.1f} {result[what + '_ratio']:>6.2f}x"
        )
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
