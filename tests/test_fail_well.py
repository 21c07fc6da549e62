"""Every way a new user got kubetune wrong (issue #9), with the exit code and the line it must print.

`validate`, `render` and `run` read a manifest through one path and refuse it with the same
problems; `run --dry-run` stops before torch, so none of these cases trains anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from kubetune.cli.main import main

GOOD = """\
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata:
  name: demo
spec:
  model: {source: file://model}
  dataset: {train: file://data/train.jsonl}
  method: lora
  lora: {r: 8, alpha: 16}
  training: {maxSteps: 2, perDeviceBatchSize: 4, seed: 1}
  distributed: {nodes: 1, procsPerNode: 1}
  output: {uri: file://out}
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "hello"}\n')
    return tmp_path


def edit(old: str, new: str) -> Callable[[str], str]:
    def apply(text: str) -> str:
        assert old in text, old
        return text.replace(old, new)

    return apply


def bomb(text: str) -> str:
    """A 1 KB alias bomb inside spec.affinity: 9^7 = 4.8 million leaves once expanded."""
    levels = ["      l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        levels.append(f"      l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return text.replace("  output:", "  affinity:\n    nodeAffinity:\n" + "\n".join(levels) + "\n  output:")


ALL = ("validate", "render", "run")

# id, how the text changes, commands that must refuse it, exit code, what stderr must say
CASES: list[tuple[str, Callable[[str], str], tuple[str, ...], int, str]] = [
    (
        "full-with-lora-block",
        edit("method: lora", "method: full"),
        ALL,
        64,
        "spec.lora: is only allowed with method: lora",
    ),
    (
        "duplicate-method-key",
        edit("  method: lora\n", "  method: lora\n  method: full\n"),
        ALL,
        64,
        "key 'method' is given twice",
    ),
    (
        "name-not-dns-1123",
        edit("name: demo", "name: My_Job"),
        ALL,
        64,
        "metadata.name: 'My_Job' must start with a lowercase letter",
    ),
    ("name-with-slash", edit("name: demo", "name: a/b"), ALL, 64, "metadata.name: 'a/b' must start"),
    (
        "name-300-chars",
        edit("name: demo", "name: " + "a" * 300),
        ALL,
        64,
        "metadata.name: must be at most 50 characters (got 300)",
    ),
    ("broken-second-document", lambda t: t + "---\nkind: [\n", ALL, 64, "document 2 is not valid YAML: line"),
    (
        "env-rank",
        edit("  output:", "  env: [{name: RANK, value: '3'}]\n  output:"),
        ALL,
        64,
        "spec.env[0].name: RANK is set by kubetune",
    ),
    (
        "gpu-quantity-word",
        edit("  output:", "  resources: {limits: {nvidia.com/gpu: eight}}\n  output:"),
        ALL,
        64,
        "spec.resources.limits.nvidia.com/gpu: has an unsupported form (got 'eight'); expected a Kubernetes quantity",
    ),
    (
        "gpus-per-node-word",
        edit("procsPerNode: 1}", "procsPerNode: 1, gpusPerNode: eight}"),
        ALL,
        64,
        "spec.distributed.gpusPerNode: must be an integer (got 'eight')",
    ),
    (
        "deepspeed-on-cpu",
        edit("procsPerNode: 1}", "procsPerNode: 1, backend: deepspeed}"),
        ALL,
        64,
        "spec.distributed.backend: deepspeed needs GPUs",
    ),
    (
        "freeze-with-lora",
        edit("  output:", "  freeze: {firstNLayers: 1}\n  output:"),
        ALL,
        64,
        "spec.freeze: applies to method: full",
    ),
    (
        "eval-steps-without-eval-data",
        edit("maxSteps: 2,", "maxSteps: 2, evalSteps: 1,"),
        ALL,
        64,
        "spec.training.evalSteps: needs evaluation data",
    ),
    (
        "s3-without-bucket",
        edit("file://data/train.jsonl", "s3:///data/x.jsonl"),
        ALL,
        64,
        "spec.dataset.train: has an unsupported form (got 's3:///data/x.jsonl')",
    ),
    (
        "output-is-the-training-file",
        edit("file://out", "file://data/train.jsonl"),
        ALL,
        64,
        "overlaps spec.dataset.train",
    ),
    ("output-is-the-model-dir", edit("file://out", "file://model"), ALL, 64, "overlaps spec.model.source"),
    (
        "seed-2-to-the-32",
        edit("seed: 1", "seed: 4294967296"),
        ALL,
        64,
        "spec.training.seed: must be <= 4294967295 (got 4294967296)",
    ),
    ("alias-bomb-in-affinity", bomb, ALL, 64, "expands to more than 100,000 values"),
    (
        "metadata-is-a-list",
        edit("metadata:\n  name: demo", "metadata: [x]"),
        ALL,
        64,
        "metadata: must be a mapping",
    ),
    ("tab-in-yaml", edit("  method: lora", "\tmethod: lora"), ALL, 64, "indent with spaces, not tabs"),
    ("r-as-string", edit("r: 8", 'r: "16"'), ALL, 64, "spec.lora.r: must be an integer (got '16')"),
    (
        "merge-adapter-as-string",
        edit("uri: file://out}", 'uri: file://out, mergeAdapter: "false"}'),
        ALL,
        64,
        "spec.output.mergeAdapter: must be true or false (got 'false')",
    ),
    (
        "no-api-version",
        edit("apiVersion: kubetune.io/v1alpha1\n", ""),
        ALL,
        64,
        "apiVersion: must be kubetune.io/v1alpha1",
    ),
    (
        "alpha-inf",
        edit("alpha: 16", "alpha: .inf"),
        ALL,
        64,
        "spec.lora.alpha: must be a finite number (got inf)",
    ),
    (
        "cpu-eight",
        edit("  output:", "  resources: {requests: {cpu: eight}}\n  output:"),
        ALL,
        64,
        "spec.resources.requests.cpu: has an unsupported form (got 'eight')",
    ),
    (
        "annotations-300-kb",
        edit("  output:", "  annotations: {big: '" + "x" * 300_000 + "'}\n  output:"),
        ALL,
        64,
        "spec.annotations: total 300,003 bytes; Kubernetes allows at most 262,144",
    ),
    (
        "annotations-10-mb",
        edit("  output:", "  annotations: {big: '" + "x" * 10_000_000 + "'}\n  output:"),
        ALL,
        64,
        "is larger than 3 MiB",
    ),
    (
        "global-batch-33-nproc-3",
        edit("perDeviceBatchSize: 4,", "perDeviceBatchSize: 4, globalBatchSize: 33,"),
        ("run",),
        64,
        "spec.training.globalBatchSize: must be a multiple of perDeviceBatchSize x nodes x procsPerNode = 12",
    ),
    ("missing-model", edit("file://model", "file://no-such-model"), ("run",), 65, "spec.model.source:"),
    (
        "missing-training-file",
        edit("data/train.jsonl", "data/nope.jsonl"),
        ("run",),
        66,
        "spec.dataset.train:",
    ),
    ("bad-set-override", lambda t: t, ("run",), 64, "--set"),
]


def argv_for(command: str, path: Path, case: str) -> list[str]:
    if command == "run":
        extra = ["--nproc", "3"] if case == "global-batch-33-nproc-3" else []
        extra += ["--set", "training"] if case == "bad-set-override" else []
        return ["run", str(path), "--dry-run", *extra]
    return [command, str(path)]


@pytest.mark.parametrize("case,change,commands,code,message", CASES, ids=[c[0] for c in CASES])
def test_each_case_is_refused_with_its_code_and_message(
    workdir, capsys, case, change, commands, code, message
):
    path = workdir / "job.yaml"
    path.write_text(change(GOOD))
    for command in commands:
        rc = main(argv_for(command, path, case))
        err = capsys.readouterr().err
        assert rc == code, f"{command}: exit {rc}\n{err}"
        assert message in err, f"{command}:\n{err}"
        assert "Traceback" not in err and "internal error" not in err


def test_the_good_manifest_passes_every_command(workdir, capsys):
    path = workdir / "job.yaml"
    path.write_text(GOOD)
    assert main(["validate", str(path)]) == 0
    assert main(["render", str(path)]) == 0
    assert main(["run", str(path), "--dry-run"]) == 0
    assert "kubetune_trainer --config" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "no such file"),
        ("dir", "is a directory"),
        (b"\x7fELF\x00\x01\x02", "is a binary file"),
        (b"\xff\xfe kind", "is not UTF-8 text"),
    ],
    ids=["missing", "directory", "binary", "not-utf8"],
)
def test_files_that_are_not_manifests(workdir, capsys, content, message):
    path = workdir / "job.yaml"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    for command in ALL:
        rc = main([command, str(path)] + (["--dry-run"] if command == "run" else []))
        err = capsys.readouterr().err
        assert rc == 64 and message in err and "Traceback" not in err, f"{command}: {rc}\n{err}"


def test_every_problem_is_reported_at_once(workdir, capsys):
    text = GOOD.replace("r: 8", 'r: "16"').replace("alpha: 16", "alpha: .inf").replace("seed: 1", "seed: -1")
    path = workdir / "job.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 64
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    assert "spec.lora.r" in err and "spec.lora.alpha" in err and "spec.training.seed" in err


def test_output_that_cannot_be_written_is_refused_before_the_model_loads(workdir, capsys):
    blocker = workdir / "a-file"
    blocker.write_text("x")
    path = workdir / "job.yaml"
    path.write_text(GOOD.replace("file://out", "file://a-file/out"))
    assert main(["run", str(path), "--dry-run"]) == 64
    assert "spec.output.uri: cannot write to" in capsys.readouterr().err


def test_too_little_disk_for_a_checkpoint_is_refused(workdir, capsys):
    out = workdir / "out"
    out.mkdir()
    free = os.statvfs(out).f_bavail * os.statvfs(out).f_frsize
    with open(workdir / "model" / "model.safetensors", "wb") as f:
        f.truncate(free)  # sparse: the size a full fine-tune must save 4 times, with no blocks used
    path = workdir / "job.yaml"
    path.write_text(GOOD.replace("method: lora", "method: full").replace("  lora: {r: 8, alpha: 16}\n", ""))
    assert main(["run", str(path), "--dry-run"]) == 64
    err = capsys.readouterr().err
    assert "MiB free; a checkpoint and the final model need about" in err


def test_hostile_manifest_is_refused_fast_and_small_without_torch(workdir):
    """The alias bomb through `run`: refused by a process that never imports torch and stays under 100 MB."""
    path = workdir / "job.yaml"
    path.write_text(bomb(GOOD))
    probe = (  # VmHWM: this process's peak RSS (ru_maxrss would carry the forking pytest's over exec)
        "import re, sys\n"
        "from kubetune.cli.main import main\n"
        f"rc = main(['run', {str(path)!r}])\n"
        "peak = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1]\n"
        "print(rc, 'torch' in sys.modules, peak)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    rc, torch_loaded, peak_kb = proc.stdout.split()
    assert rc == "64" and torch_loaded == "False", proc.stderr
    assert "expands to more than 100,000 values" in proc.stderr
    assert int(peak_kb) < 100 * 1024


def test_render_output_is_the_objects(workdir, capsys):
    path = workdir / "job.yaml"
    path.write_text(
        GOOD.replace("file://model", "s3://models/tiny")
        .replace("file://data/train.jsonl", "s3://data/t.jsonl")
        .replace("file://out", "s3://out/x")
    )
    assert main(["render", str(path)]) == 0
    kinds = [d["kind"] for d in yaml.safe_load_all(capsys.readouterr().out)]
    assert kinds == ["ConfigMap", "Service", "Job"]


TORCHRUN_TAIL = """\
[kubetune] error: rank 0 lost its peers
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
kubetune_trainer FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-29_23:00:01
  host      : node-a
  rank      : 0 (local_rank: 0)
  exitcode  : 75 (pid: 101)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-29_23:00:00
  host      : node-a
  rank      : {rank} (local_rank: {rank})
  exitcode  : {code} (pid: 102)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 102
============================================================
"""


def test_a_killed_rank_is_named_not_its_peers_connection_errors(tmp_path):
    from kubetune.cli.run import failure_line

    peer = {
        "exitCode": 75,
        "reason": "InfrastructureError",
        "message": "RuntimeError: [gloo] Connection reset by peer",
    }
    code, line = failure_line(1, peer, TORCHRUN_TAIL.format(rank=1, code=-9), tmp_path / "train.log")
    assert code == 75
    assert (
        line
        == f"kubetune run: failed: rank 1 on node-a: exit code 75 (Killed): killed by SIGKILL (out of memory? see `dmesg`); log {tmp_path / 'train.log'}"
    )


def test_a_user_error_keeps_its_code_reason_and_message(tmp_path):
    from kubetune.cli.run import failure_line

    detail = {"exitCode": 66, "reason": "DatasetInvalid", "message": "train.jsonl line 3: not JSON"}
    code, line = failure_line(1, detail, TORCHRUN_TAIL.format(rank=1, code=66), tmp_path / "train.log")
    assert code == 66
    assert line.startswith(
        "kubetune run: failed: rank 1 on node-a: exit code 66 (DatasetInvalid): train.jsonl line 3: not JSON; log "
    )
    assert line.count("\n") == 0


def test_a_full_disk_is_a_user_error_naming_the_path():
    from kubetune_trainer.errors import user_os_error

    with pytest.raises(OSError) as caught, open("/dev/full", "w") as full:  # a real ENOSPC
        full.write("x")
        full.flush()
    caught.value.filename = "/out/checkpoints/step-00000010/model.safetensors"
    error = user_os_error(caught.value)
    assert error is not None and error.exit_code == 64
    assert error.message.startswith(
        "writing /out/checkpoints/step-00000010/model.safetensors: the volume is full (No space left on device)"
    )


def test_a_read_only_output_is_a_user_error_and_a_reset_connection_is_not():
    import errno

    from kubetune_trainer.errors import user_os_error

    read_only = user_os_error(OSError(errno.EROFS, "Read-only file system", "/out/COMPLETE"))
    assert (
        read_only is not None
        and read_only.exit_code == 64
        and "/out/COMPLETE: the volume is read-only" in read_only.message
    )
    assert user_os_error(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")) is None
