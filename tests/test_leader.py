"""Leader election: its settings, the rule for taking a Lease, what a candidate writes, and the standby's
liveness answer. The election itself runs against a real API server in e2e/test_leader_election.py and
e2e/suite/test_ha.py."""

from __future__ import annotations

import argparse
import socket
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest
from kubetune.cli import operator as operator_cli
from kubetune.controller.leader import (
    LeaseRecord,
    claim,
    lease_namespace,
    may_take,
    micro_time,
    released,
    serve_standby_health,
)
from kubetune.controller.settings import Settings
from pydantic import ValidationError

AT = datetime(2026, 11, 30, 1, 2, 3, 456789, tzinfo=timezone.utc)


def record(holder: str | None = "a", duration: float | None = 15, transitions: int = 3) -> LeaseRecord:
    return LeaseRecord(
        holder, duration, "2026-11-30T00:00:00.000000Z", "2026-11-30T00:59:00.000000Z", transitions, "7"
    )


# ------------------------------------------------------------------ settings


def test_leader_election_is_off_by_default_with_client_go_timings():
    s = Settings()
    assert s.leader_elect is False
    assert (s.leader_elect_lease_duration, s.leader_elect_renew_deadline, s.leader_elect_retry_period) == (
        15,
        10,
        2,
    )
    assert s.leader_elect_lease_name == "kubetune-operator" and s.leader_elect_namespace == ""


def test_leader_election_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("KUBETUNE_LEADER_ELECT", "true")
    monkeypatch.setenv("KUBETUNE_LEADER_ELECT_NAMESPACE", "kubetune-system")
    monkeypatch.setenv("KUBETUNE_LEADER_ELECT_LEASE_DURATION", "8")
    monkeypatch.setenv("KUBETUNE_LEADER_ELECT_RENEW_DEADLINE", "5")
    monkeypatch.setenv("KUBETUNE_LEADER_ELECT_RETRY_PERIOD", "1")
    s = Settings()
    assert s.leader_elect and s.leader_elect_namespace == "kubetune-system"
    assert (s.leader_elect_lease_duration, s.leader_elect_renew_deadline, s.leader_elect_retry_period) == (
        8,
        5,
        1,
    )


@pytest.mark.parametrize(
    ("values", "field", "words"),
    [
        (
            {"leader_elect_lease_duration": 10, "leader_elect_renew_deadline": 10},
            "leader_elect_renew_deadline",
            "shorter than the lease duration",
        ),
        (
            {"leader_elect_renew_deadline": 10, "leader_elect_retry_period": 9},
            "leader_elect_retry_period",
            "under the renew deadline",
        ),
        ({"leader_elect_lease_duration": 0.5}, "leader_elect_lease_duration", "greater than or equal to 1"),
        ({"peering": True, "leader_elect": True}, "leader_elect", "turn peering off"),
        ({"leader_elect_lease_name": "Kubetune_Operator"}, "leader_elect_lease_name", "pattern"),
    ],
)
def test_inconsistent_leader_election_settings_are_refused_naming_the_field(values, field, words):
    with pytest.raises(ValidationError) as exc:
        Settings(**values)
    err = exc.value.errors()[0]
    assert err["loc"] == (field,) and words in err["msg"]


def test_the_operator_command_prints_one_line_naming_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("KUBETUNE_LEADER_ELECT_RENEW_DEADLINE", "20")
    parser = argparse.ArgumentParser()
    operator_cli.add_arguments(parser)
    assert operator_cli.run(parser.parse_args(["--leader-elect"])) == 2
    out = capsys.readouterr().out.strip()
    assert out.startswith("kubetune operator: KUBETUNE_LEADER_ELECT_RENEW_DEADLINE") and "\n" not in out


def test_the_leader_elect_flag_turns_it_on():
    parser = argparse.ArgumentParser()
    operator_cli.add_arguments(parser)
    assert operator_cli.settings_from(parser.parse_args(["--leader-elect"])).leader_elect is True
    assert operator_cli.settings_from(parser.parse_args([])).leader_elect is False


# ------------------------------------------------------------------ taking the lease


def test_an_absent_free_or_own_lease_may_be_taken_at_once():
    assert may_take(None, "b", observed_at=100, now=100, duration=15)
    assert may_take(record(holder=None), "b", observed_at=100, now=100, duration=15)
    assert may_take(record(holder="b"), "b", observed_at=100, now=100, duration=15)


def test_another_holders_lease_is_taken_only_after_it_stood_still_for_its_duration():
    held = record(holder="a", duration=15)
    assert not may_take(
        held, "b", observed_at=100, now=114.9, duration=5
    )  # the holder's duration counts, not ours
    assert may_take(held, "b", observed_at=100, now=115, duration=5)
    assert may_take(record(holder="a", duration=None), "b", observed_at=100, now=105, duration=5)


def test_taking_over_counts_a_transition_and_stamps_acquire_time():
    spec = claim(record(holder="a", transitions=3), "b", 15, AT)
    assert spec == {"holderIdentity": "b", "leaseDurationSeconds": 15, "acquireTime": "2026-11-30T01:02:03.456789Z",
                    "renewTime": "2026-11-30T01:02:03.456789Z", "leaseTransitions": 4}  # fmt: skip


def test_renewing_keeps_acquire_time_and_transitions():
    spec = claim(record(holder="b", transitions=3), "b", 15, AT)
    assert spec["acquireTime"] == "2026-11-30T00:00:00.000000Z" and spec["renewTime"] == micro_time(AT)
    assert spec["leaseTransitions"] == 3


def test_a_new_lease_counts_no_transition_and_taking_a_released_one_counts_one():
    assert claim(None, "b", 7.5, AT)["leaseTransitions"] == 0
    assert claim(None, "b", 7.5, AT)["leaseDurationSeconds"] == 8  # whole seconds, rounded up
    assert claim(record(holder=None, transitions=3), "b", 15, AT)["leaseTransitions"] == 4


def test_a_released_lease_has_no_holder_and_expires_at_once():
    spec = released(record(holder="b", transitions=4), AT)
    assert (
        spec["holderIdentity"] is None and spec["leaseDurationSeconds"] == 1 and spec["leaseTransitions"] == 4
    )
    assert may_take(LeaseRecord.of({"spec": spec}), "c", observed_at=100, now=100, duration=15)


def test_a_lease_record_reads_the_api_object():
    lease = {"metadata": {"resourceVersion": "42"},
             "spec": {"holderIdentity": "pod-1_ab12", "leaseDurationSeconds": 15, "renewTime": "t", "leaseTransitions": 2}}  # fmt: skip
    assert LeaseRecord.of(lease) == LeaseRecord("pod-1_ab12", 15, None, "t", 2, "42")
    assert LeaseRecord.of({"metadata": {}, "spec": {"holderIdentity": ""}}).holder is None


def test_the_lease_lives_in_the_configured_namespace_else_the_pods_own(tmp_path: Path):
    sa = tmp_path / "namespace"
    sa.write_text("kubetune-system\n")
    assert lease_namespace("ops", sa) == "ops"
    assert lease_namespace("", sa) == "kubetune-system"
    assert lease_namespace("", tmp_path / "absent") == "default"


# ------------------------------------------------------------------ standby liveness


def test_a_standby_answers_the_liveness_path_and_frees_the_port_when_it_leads():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve_standby_health(f"http://127.0.0.1:{port}/healthz")
    assert server is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        assert resp.status == 200 and resp.read() == b"standby\n"
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
    server.shutdown()
    server.server_close()
    again = serve_standby_health(f"http://127.0.0.1:{port}/healthz")  # what Kopf's endpoint does next
    assert again is not None
    again.shutdown()
    again.server_close()


def test_the_lease_the_operator_creates_carries_the_recommended_labels():
    import json
    from types import SimpleNamespace

    from kubetune.controller.leader import Elector

    created: list[dict] = []

    class Api:
        def create_namespaced_lease(self, namespace, body, **_):  # type: ignore[no-untyped-def]
            created.append(body)
            return SimpleNamespace(data=json.dumps(body))

    Elector("kubetune-system", "kubetune", "pod-a_1", api=Api())._create()
    assert created[0]["metadata"]["labels"] == {
        "app.kubernetes.io/name": "kubetune", "app.kubernetes.io/instance": "kubetune",
        "app.kubernetes.io/component": "leader-election", "app.kubernetes.io/managed-by": "kubetune",
        "app.kubernetes.io/part-of": "kubetune"}  # fmt: skip


def test_the_events_the_operator_posts_carry_the_recommended_labels():
    from kubetune.controller.kube import event_for

    body = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "ml", "uid": "u"},
    }
    labels = event_for(body, "Normal", "Created", "made")["metadata"]["labels"]
    assert (labels["app.kubernetes.io/instance"], labels["app.kubernetes.io/component"]) == ("demo", "event")
