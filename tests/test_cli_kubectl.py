"""The CLI keeps kubectl's conventions: `-o yaml|json|wide|name` is always the output format (files and
directories have their own flags); connection and configuration errors are one line on stderr and exit 1.

The table below runs every cluster command, in-process through `main()`, against an API server that is not
there (a closed port), a context the kubeconfig lacks, and no kubeconfig at all; e2e/test_cli_cluster.py
runs the output formats, -A, -l and a refused token against a real API server.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml
from kubetune.cli.main import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the socket goes: connections are refused


def kubeconfig(path: Path, server: str, token: str = "t0ken") -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "dev",
        "clusters": [{"name": "dev", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
        "users": [{"name": "dev", "user": {"token": token}}],
        "contexts": [{"name": "dev", "context": {"cluster": "dev", "user": "dev", "namespace": "ml"}}],
    }))  # fmt: skip
    return path


# Every command that talks to a cluster, with the arguments it needs to get that far.
CLUSTER_COMMANDS = {
    "submit": ["submit", str(QUICKSTART)],
    "get": ["get"],
    "get NAME": ["get", "quickstart"],
    "get -A": ["get", "-A"],
    "get -w": ["get", "-w"],
    "describe": ["describe", "quickstart"],
    "logs": ["logs", "quickstart"],
    "suspend": ["suspend", "quickstart"],
    "resume": ["resume", "quickstart"],
    "delete": ["delete", "quickstart"],
    "download": ["download", "quickstart", "{tmp}/out"],
    "report": ["report", "quickstart"],
    "operator": ["operator", "-n", "ml"],
}
# The operator has no --context (it runs the kubeconfig's current context, or in-cluster).
NO_CONTEXT_FLAG = {"operator"}


def test_the_table_covers_every_cluster_command() -> None:
    cluster = {name for name, (module, _) in SUBCOMMANDS.items()
               if module.split(".")[-1] in ("submit", "get", "describe", "logs", "lifecycle", "download", "report")}  # fmt: skip
    assert cluster | {"operator"} == {argv[0] for argv in CLUSTER_COMMANDS.values()}


@pytest.fixture
def no_cluster_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


TABLE = [(case, command) for case in ("unreachable", "bad context", "no kubeconfig") for command in CLUSTER_COMMANDS
         if not (case == "bad context" and command in NO_CONTEXT_FLAG)]  # fmt: skip


@pytest.mark.parametrize(("case", "command"), TABLE)
def test_connection_and_config_errors_are_one_line_and_exit_1(case: str, command: str, no_cluster_env: Path,
                                                               monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # fmt: skip
    tmp = no_cluster_env
    argv = [a.format(tmp=tmp) for a in CLUSTER_COMMANDS[command]]
    port = closed_port()
    if case != "no kubeconfig":
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp / "config", f"https://127.0.0.1:{port}")))
    if case == "bad context":
        argv += ["--context", "nope"]
    code = main(argv)
    err = capsys.readouterr().err
    first = err.splitlines()[0] if err else ""
    expected = {
        "unreachable": f"kubetune {argv[0]}: cannot connect to the API server at https://127.0.0.1:{port} (",
        "bad context": f'kubetune {argv[0]}: context "nope" does not exist in {tmp / "config"}',
        "no kubeconfig": f"kubetune {argv[0]}: no kubeconfig at ~/.kube/config: set KUBECONFIG or --kubeconfig",
    }[case]
    assert (code, first[: len(expected)]) == (1, expected), err
    assert len(err.splitlines()) == 1 and "internal error" not in err and "Traceback" not in err


def test_unreachable_names_the_reason(no_cluster_env: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    port = closed_port()
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(no_cluster_env / "config", f"https://127.0.0.1:{port}")))
    assert main(["get"]) == 1
    assert "Connection refused" in capsys.readouterr().err


# ------------------------------------------------------------------ -o is a format; files have their own flags


def test_crd_prints_yaml_or_json_and_writes_files_with_output_file(tmp_path: Path, capsys) -> None:
    committed = (ROOT / "crds" / "kubetune.io_finetunejobs.yaml").read_text()
    assert main(["crd"]) == 0 and capsys.readouterr().out == committed
    assert main(["crd", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == yaml.safe_load(committed)
    assert main(["crd", "--output-file", str(tmp_path / "crd.yaml")]) == 0
    assert (tmp_path / "crd.yaml").read_text() == committed


@pytest.mark.parametrize(("argv", "bad"), [(["crd", "-o", "crds/x.yaml"], "crds/x.yaml"),
                                           (["report", "job", "-o", "card"], "-o")])  # fmt: skip
def test_o_is_never_a_path(argv: list[str], bad: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and bad in capsys.readouterr().err


def test_every_command_that_prints_objects_takes_the_four_formats(capsys) -> None:
    for command in ("get", "describe", "render", "submit"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "yaml|json|wide|name" in capsys.readouterr().out, command


def test_render_formats(capsys) -> None:
    assert main(["render", str(QUICKSTART)]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Job"]
    assert main(["render", str(QUICKSTART), "-o", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["kind"] == "List" and listed["items"] == docs
    assert main(["render", str(QUICKSTART), "-o", "name"]) == 0
    names = capsys.readouterr().out.splitlines()
    assert names == ["configmap/" + docs[0]["metadata"]["name"], "service/" + docs[1]["metadata"]["name"],
                     "job.batch/" + docs[2]["metadata"]["name"]]  # fmt: skip
    assert main(["render", str(QUICKSTART), "-o", "wide"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["KIND", "NAME", "NAMESPACE", "IMAGE"] and len(table) == 4
    image = docs[2]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert table[3].split() == ["Job", names[2], "default", image]


# ------------------------------------------------------------------ get / describe / submit formats
# The SDK's calls run against a real API server in e2e/test_cli_cluster.py; here a recorder stands in for the
# Client, so that each format's exact output is checked.


def job(name: str, namespace: str, labels: dict[str, str] | None = None) -> object:
    from kubetune.client.jobs import from_object

    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["metadata"] = {"name": name, "namespace": namespace, "labels": labels or {}}
    doc["status"] = {"phase": "Running", "restarts": 1}
    return from_object(doc)


class Recorder:
    namespace = "ml"

    def __init__(self) -> None:
        self.jobs = [job("a", "ml", {"team": "nlp"}), job("b", "ml"), job("c", "other", {"team": "nlp"})]
        self.calls: list[tuple] = []

    def list(self, phase=None, label_selector=None, all_namespaces=False):  # type: ignore[no-untyped-def]
        self.calls.append(("list", label_selector, all_namespaces))
        return [j for j in self.jobs if all_namespaces or j.metadata.namespace == "ml"]

    def get(self, name):  # type: ignore[no-untyped-def]
        return next(j for j in self.jobs if j.metadata.name == name)

    def events(self, name):  # type: ignore[no-untyped-def]
        return [{"type": "Normal", "reason": f"R{i}", "message": f"event {i}"} for i in range(20)]

    def submit(self, path):  # type: ignore[no-untyped-def]
        return job("quickstart", "ml")


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    from kubetune.cli import describe, get, submit

    client = Recorder()
    for module in (get, describe, submit):
        monkeypatch.setattr(module, "client_from", lambda args: client)
    return client


def test_get_all_namespaces_adds_the_namespace_column(recorder: Recorder, capsys) -> None:
    assert main(["get", "-A"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["NAMESPACE", "NAME", "PHASE"]
    assert [line.split()[:2] for line in lines[1:]] == [["ml", "a"], ["ml", "b"], ["other", "c"]]
    assert recorder.calls == [("list", None, True)]


def test_get_passes_the_label_selector_and_prints_names(recorder: Recorder, capsys) -> None:
    assert main(["get", "-l", "team=nlp", "-o", "name"]) == 0
    assert capsys.readouterr().out == "finetunejob.kubetune.io/a\nfinetunejob.kubetune.io/b\n"
    assert recorder.calls == [("list", "team=nlp", False)]  # the selecting is the API server's


def test_get_wide_adds_method_gang_and_model(recorder: Recorder, capsys) -> None:
    assert main(["get", "-o", "wide"]) == 0
    header, first, _ = capsys.readouterr().out.splitlines()
    assert header.split()[-4:] == ["METHOD", "NODES", "GPUS/NODE", "MODEL"]
    spec = recorder.jobs[0].spec  # type: ignore[attr-defined]
    assert first.split()[-4:] == [
        spec.method,
        "1x" + str(spec.distributed.procs_per_node),
        "0",
        spec.model.source,
    ]


def test_get_name_with_all_namespaces_is_refused(recorder: Recorder, capsys) -> None:
    assert main(["get", "a", "-A"]) == 2
    assert "-A" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_get_yaml_json_is_a_list_and_one_job_is_the_object(fmt: str, recorder: Recorder, capsys) -> None:
    load = json.loads if fmt == "json" else yaml.safe_load
    assert main(["get", "-o", fmt]) == 0
    listed = load(capsys.readouterr().out)
    assert listed["kind"] == "List" and [i["metadata"]["name"] for i in listed["items"]] == ["a", "b"]
    assert main(["get", "a", "-o", fmt]) == 0
    assert load(capsys.readouterr().out)["metadata"] == {
        "name": "a",
        "namespace": "ml",
        "labels": {"team": "nlp"},
    }


def test_describe_formats(recorder: Recorder, capsys) -> None:
    assert main(["describe", "a"]) == 0
    text = capsys.readouterr().out
    assert (
        text.startswith("Name:         a\n") and "event 19" in text and "event 4\n" not in text
    )  # the last 15
    assert main(["describe", "a", "-o", "wide"]) == 0
    assert "event 0\n" in capsys.readouterr().out  # every Event
    assert main(["describe", "a", "-o", "name"]) == 0
    assert capsys.readouterr().out == "finetunejob.kubetune.io/a\n"
    assert main(["describe", "a", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "FineTuneJob"


def test_submit_formats(recorder: Recorder, capsys) -> None:
    assert main(["submit", str(QUICKSTART)]) == 0
    assert capsys.readouterr().out == "finetunejob.kubetune.io/quickstart created\n"
    assert main(["submit", str(QUICKSTART), "-o", "name"]) == 0
    assert capsys.readouterr().out == "finetunejob.kubetune.io/quickstart\n"
    assert main(["submit", str(QUICKSTART), "-o", "yaml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["metadata"]["name"] == "quickstart"
    assert main(["submit", str(QUICKSTART), "-o", "wide"]) == 0
    assert capsys.readouterr().out.split()[:2] == ["NAME", "PHASE"]
