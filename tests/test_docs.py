"""The manual says what the code does: generated pages are current, every contract value is documented,
the README stays the short path and its commands and manifests work. (`make docs` builds the site with
`mkdocs build --strict`, which fails on a broken link or anchor.)"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.api import contract
from kubetune.api.validation import validate_manifest
from kubetune.status import conditions

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def manual() -> str:
    return "\n".join(p.read_text() for p in sorted(DOCS.rglob("*.md")))


def sections(page: str) -> dict[str, str]:
    """`## heading {#id}` -> the section's text, keyed by the id."""
    out: dict[str, str] = {}
    for part in re.split(r"\n(?=## )", page):
        m = re.match(r"## .*\{ #([a-z0-9-]+) \}", part)
        if m:
            out[m.group(1)] = part
    return out


# ---------------------------------------------------------------- generated pages


def test_generated_reference_pages_are_current() -> None:
    stale = [
        str(path.relative_to(ROOT))
        for path, text in _generator().pages().items()
        if not path.exists() or path.read_text() != text
    ]
    assert not stale, f"stale: {stale}; run `make docs-gen` (python docs/gen_reference.py)"


def crd_fields(schema: dict[str, Any], path: str = "") -> list[tuple[str, str]]:
    """(parent path, field name) of every field in the CRD, walked here independently of the generator."""
    out = []
    for name, sub in schema.get("properties", {}).items():
        child = f"{path}.{name}" if path else name
        out.append((path, name))
        out += crd_fields(sub, child)
        if isinstance(sub.get("items"), dict):
            out += crd_fields(sub["items"], f"{child}[]")
        if isinstance(sub.get("additionalProperties"), dict):
            out += crd_fields(sub["additionalProperties"], f"{child}{{}}")
    return out


def test_the_api_reference_has_every_field_of_the_crd() -> None:
    gen = _generator()
    crd = yaml.safe_load((ROOT / "crds" / "kubetune.io_finetunejobs.yaml").read_text())
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    page = sections((DOCS / "reference" / "finetunejob.md").read_text())
    fields = crd_fields(root)
    assert len(fields) > 250  # the whole spec and status, nested blocks included
    missing = [
        f"{parent}.{name}"
        for parent, name in fields
        if not re.search(rf"^\| `{re.escape(name)}`", page.get(gen.anchor(parent) or "finetunejob", ""), re.M)
    ]
    assert not missing, f"fields missing from docs/reference/finetunejob.md: {missing}"
    for path in (
        "spec.dataset.preference",
        "spec.objective",
        "spec.dpo",
        "spec.model.quantization",
        "spec.runPolicy.progressDeadlineSeconds",
        "spec.output.resumeFrom",
        "spec.output.publish",
        "spec.promptTuning",
        "spec.prefixTuning",
        "spec.ia3",
    ):
        parent, name = path.rsplit(".", 1)
        if name == "preference":  # a format, not a field
            assert "`preference`" in page[gen.anchor("spec.dataset")]
            continue
        assert re.search(rf"^\| `{name}`", page[gen.anchor(parent)], re.M), path
    methods = re.search(r"^\| `method` .*$", page["spec"], re.M)
    assert methods and all(
        f"`{m}`" in methods.group(0)
        for m in ("lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "full")
    )


def test_the_cli_reference_has_every_subcommand_and_option() -> None:
    from kubetune.cli.main import build_parser

    page = (DOCS / "reference" / "cli.md").read_text()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert len(sub.choices) >= 15
    for name, parser in sub.choices.items():
        section = sections(page)[f"kubetune-{name}"]
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}" in section, f"kubetune {name} {option}"


# ---------------------------------------------------------------- the contract


def _reasons() -> set[str]:
    return {str(r.value) for r in conditions.Reason}


def test_every_exit_code_is_in_the_exit_code_table() -> None:
    table = sections_by_title((DOCS / "reference" / "status.md").read_text())["Exit codes"]
    for code in contract.ExitCode:
        reason = contract.REASONS.get(code, "")
        assert re.search(rf"^\| {int(code)} \| {reason} ?\|", table, re.M), f"exit code {int(code)} {reason}"
        restart = "no" if code in contract.USER_ERRORS else "yes"
        if code != contract.ExitCode.OK:
            row = re.search(rf"^\| {int(code)} \|.*$", table, re.M)
            assert row and row.group(0).rstrip(" |").split("|")[-1].strip().startswith(restart), row


def sections_by_title(page: str) -> dict[str, str]:
    return {
        part.split("\n", 1)[0][3:].strip(): part
        for part in re.split(r"\n(?=## )", page)
        if part.startswith("## ")
    }


def test_every_condition_reason_and_type_is_documented() -> None:
    status = sections_by_title((DOCS / "reference" / "status.md").read_text())
    reasons = _reasons()
    assert len(reasons) >= 19
    missing = [r for r in sorted(reasons) if not re.search(rf"^\| `{r}`(,| \|)", status["Reasons"], re.M)]
    assert not missing, f"condition reasons not in docs/reference/status.md: {missing}"
    missing_types = [t for t in conditions.ORDER if f"| `{t}` |" not in status["Conditions"]]
    assert not missing_types, missing_types
    trainer = [r for r in contract.REASONS.values() if f"`{r}`" not in manual()]
    assert not trainer, trainer


# ---------------------------------------------------------------- README and manual


def test_the_readme_is_the_short_path() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for heading in ("## Two commands", "## Install on a cluster", "## One job", "## The manual"):
        assert heading in text
    assert "make quickstart" in text and "make test" in text
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), link


def test_the_readmes_cluster_commands_match_the_examples() -> None:
    text = README.read_text() + (DOCS / "getting-started.md").read_text()
    text += (DOCS / "operations" / "install.md").read_text()
    applied = re.findall(r"kubectl apply --server-side -f (crds[^\s`]*)", text)
    assert applied
    for target in applied:
        path = ROOT / target
        files = sorted(path.glob("*")) if path.is_dir() else [path]
        read = [f for f in files if f.suffix in (".yaml", ".yml", ".json")]  # what kubectl apply -f DIR reads
        assert read and all(
            yaml.safe_load(f.read_text())["kind"] == "CustomResourceDefinition" for f in read
        ), target
    created = set(re.findall(r"kubectl create secret generic ([a-z0-9-]+)", text))
    used: set[str] = set()
    for example in ("lora-1gpu", "cpu-2node-lora", "kueue"):
        for doc in yaml.safe_load_all((ROOT / "examples" / f"{example}.yaml").read_text()):
            spec = doc["spec"]
            used.add(spec["storage"]["secretRef"]["name"])
            used |= {e["valueFrom"]["secretKeyRef"]["name"] for e in spec.get("env", []) if "valueFrom" in e}
    assert used <= created, f"the examples read Secrets the README does not create: {used - created}"


def manifests(text: str) -> list[dict[str, Any]]:
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    return [
        d
        for b in blocks
        for d in yaml.safe_load_all(b)
        if isinstance(d, dict) and d.get("kind") == "FineTuneJob"
    ]


@pytest.mark.parametrize(
    "page", [README, *sorted(DOCS.rglob("*.md"))], ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_whole_manifest_in_the_docs_is_valid(page: Path) -> None:
    for doc in manifests(page.read_text()):
        _, problems = validate_manifest(doc)
        assert not problems, (page.name, doc["metadata"]["name"], problems)


def prose(text: str) -> str:
    """The text outside code blocks and code spans."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def test_the_manual_is_not_a_lab_notebook() -> None:
    for page in [README, *sorted(DOCS.rglob("*.md"))]:
        text = prose(page.read_text())
        dates = re.findall(r"\b20\d\d-\d\d-\d\d\b", text)
        commits = [
            h
            for h in re.findall(r"\b[0-9a-f]{7,40}\b", text)
            if re.search(r"[a-f]", h) and re.search(r"\d", h)
        ]
        assert not dates and not commits, (
            f"{page.relative_to(ROOT)}: dated figures belong in bench/README.md {dates + commits}"
        )


def test_every_page_in_the_nav_exists() -> None:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    nav = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)["nav"]

    def pages(items: Any) -> list[str]:
        if isinstance(items, str):
            return [items]
        if isinstance(items, list):
            return [p for i in items for p in pages(i)]
        return [p for v in items.values() for p in pages(v)]

    listed = pages(nav)
    assert len(listed) >= 20
    assert not [p for p in listed if not (DOCS / p).is_file()]


def test_the_sdk_reference_renders_every_public_name() -> None:
    import kubetune.client

    page = (DOCS / "reference" / "sdk.md").read_text()
    missing = [n for n in kubetune.client.__all__ if f"::: kubetune.client.{n}\n" not in page]
    assert not missing, f"add `::: kubetune.client.NAME` to docs/reference/sdk.md for {missing}"


def test_the_compatibility_matrix_names_what_the_tests_run() -> None:
    rows = {
        line.split("|")[1].strip(): line
        for line in (DOCS / "operations" / "compatibility.md").read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| component")
    }
    chart = yaml.safe_load((ROOT / "charts" / "kubetune" / "Chart.yaml").read_text())
    low = re.match(r">=\s*(\d+\.\d+)", chart["kubeVersion"])
    assert low and f"{low.group(1)} or newer" in rows["Kubernetes"], "the chart's kubeVersion"
    pinned = dict(
        line.split("=", 1)
        for line in (ROOT / "e2e" / "harness" / "versions.env").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    components = {
        "KUBERNETES_VERSION": "Kubernetes",
        "HELM_VERSION": "Helm",
        "KSERVE_VERSION": "KServe",
        "REGISTRY_VERSION": "OCI registry",
        "KUEUE_VERSION": "Kueue",
    }
    stale = [
        f"{row}: {pinned[key]}"
        for key, row in components.items()
        if key in pinned and pinned[key] not in rows[row]
    ]
    assert not stale, (
        f"docs/operations/compatibility.md does not name the version the e2e suite runs: {stale}"
    )
