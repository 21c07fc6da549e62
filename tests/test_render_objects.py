"""Rendering a FineTuneJob into its ConfigMap, headless Service and Indexed Job."""

from __future__ import annotations

import yaml
from kubetune.api.names import GANG_GATE, LABEL_JOB, LABEL_QUEUE, LABEL_RESTART
from kubetune.api.trainer_config import TrainerConfig
from kubetune.render.objects import (
    render_all,
    render_config_map,
    render_service,
    render_workload,
)
from operator_samples import spec


def container(job):
    return job["spec"]["template"]["spec"]["containers"][0]


def env(job):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(job)["env"]}


def test_config_map_holds_a_loadable_trainer_config():
    cm = render_config_map(spec(), "demo", "ml", "uid-1")
    cfg = TrainerConfig.model_validate(yaml.safe_load(cm["data"]["trainer-config.yaml"]))
    assert cfg.job.name == "demo" and cfg.job.namespace == "ml" and cfg.world_size == 1


def test_service_is_headless_and_publishes_not_ready_pods():
    svc = render_service("demo", "ml")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {LABEL_JOB: "demo"}


def test_workload_is_an_indexed_job_with_one_pod_per_node():
    job = render_workload(spec(distributed={"nodes": 4}), "demo", "ml")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    assert job["spec"]["backoffLimit"] == 0


def test_one_job_serves_every_gang_generation_behind_the_gang_gate():
    """The template of a running Job cannot change: it carries no generation; each pod starts gated, and the
    operator labels it with its generation when it lifts the gate. The Job ignores pod failures (the operator
    counts restarts) and so replaces a pod only once it has stopped."""
    job = render_workload(spec(), "demo", "ml")
    assert job["metadata"]["name"] == "demo-r0"
    template = job["spec"]["template"]
    assert (
        LABEL_RESTART not in template["metadata"]["labels"] and LABEL_RESTART not in job["metadata"]["labels"]
    )
    assert template["spec"]["schedulingGates"] == [{"name": GANG_GATE}]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert [r["action"] for r in rules] == ["Ignore", "Ignore"]
    assert rules[0]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    assert rules[1]["onExitCodes"] == {"containerName": "trainer", "operator": "NotIn", "values": [0]}


def test_torchrun_rendezvous_at_rank_zero_stable_dns_name():
    job = render_workload(spec(distributed={"nodes": 2, "procsPerNode": 8, "gpusPerNode": 8}), "demo", "ml")
    c = container(job)
    # rank 0's rendezvous port is probed first (kubetune_trainer.reach), which then execs torchrun
    assert c["command"] == ["python", "-m", "kubetune_trainer.reach"]
    assert c["args"][:4] == ["--timeout-seconds", "20", "--", "torchrun"]
    args = " ".join(c["args"])
    assert "--nnodes 2 --nproc-per-node 8 --node-rank $(JOB_COMPLETION_INDEX)" in args
    assert "--master-addr demo-r0-0.demo --master-port 29500" in args
    assert args.endswith("-m kubetune_trainer --config /etc/kubetune/trainer-config.yaml")
    assert job["spec"]["template"]["spec"]["subdomain"] == "demo"


def test_gpus_are_requested_and_limited():
    job = render_workload(spec(distributed={"procsPerNode": 2, "gpusPerNode": 2}), "demo", "ml")
    res = container(job)["resources"]
    assert res["requests"]["nvidia.com/gpu"] == "2" and res["limits"]["nvidia.com/gpu"] == "2"
    assert "NCCL_DEBUG" in env(job) and "ACCELERATE_USE_CPU" not in env(job)


def test_cpu_jobs_use_gloo_and_no_gpu():
    job = render_workload(spec(), "demo", "ml")
    assert "NCCL_DEBUG" not in env(job) and "OMP_NUM_THREADS" in env(job)  # the trainer picks gloo itself
    assert "nvidia.com/gpu" not in str(container(job)["resources"])


def test_storage_credentials_come_from_the_secret():
    e = env(render_workload(spec(), "demo", "ml"))
    assert e["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}
    assert e["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    assert e["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert e["AWS_DEFAULT_REGION"] == "us-east-1"


def volume(job, name):
    return next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == name)


def test_shm_is_memory_backed_and_sized():
    assert volume(render_workload(spec(), "demo", "ml"), "kubetune-shm")["emptyDir"] == {
        "medium": "Memory",
        "sizeLimit": "16Gi",
    }
    assert (
        volume(render_workload(spec(shmSize="64Gi"), "demo", "ml"), "kubetune-shm")["emptyDir"]["sizeLimit"]
        == "64Gi"
    )


def test_scratch_is_a_sized_emptydir_and_its_disk_is_requested():
    job = render_workload(spec(scratch={"size": "200Gi"}, resources={"requests": {"cpu": "4"}}), "demo", "ml")
    assert volume(job, "kubetune-cache") == {"name": "kubetune-cache", "emptyDir": {"sizeLimit": "200Gi"}}
    assert container(job)["resources"]["requests"] == {"cpu": "4", "ephemeral-storage": "200Gi"}
    mine = render_workload(spec(resources={"requests": {"ephemeral-storage": "300Gi"}}), "demo", "ml")
    assert container(mine)["resources"]["requests"] == {
        "ephemeral-storage": "300Gi"
    }  # the user's own request wins


def test_scratch_on_a_storage_class_is_a_generic_ephemeral_volume():
    job = render_workload(spec(scratch={"size": "500Gi", "storageClassName": "local-nvme"}), "demo", "ml")
    claim = volume(job, "kubetune-cache")["ephemeral"]["volumeClaimTemplate"]
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "storageClassName": "local-nvme",
                             "resources": {"requests": {"storage": "500Gi"}}}  # fmt: skip
    assert claim["metadata"]["labels"]["app.kubernetes.io/component"] == "scratch"
    assert "ephemeral-storage" not in container(job).get("resources", {}).get("requests", {})  # not node disk
    mount = next(m for m in container(job)["volumeMounts"] if m["name"] == "kubetune-cache")
    assert mount["mountPath"] == "/var/cache/kubetune"


def test_every_object_carries_the_recommended_labels():
    from kubetune.render.serving import render_serving

    objs = render_all(spec(scheduling={"gang": {"scheduler": "volcano"}}), "demo", "ml")
    pod = next(o for o in objs if o["kind"] == "Job")["spec"]["template"]
    serving_spec = spec(serving={"kind": "Deployment", "image": "vllm"})
    deploy = render_serving(serving_spec, "demo", "ml", {"mergedModel": "s3://b/m/"})
    components = {}
    for obj in [*objs, {"kind": "Pod", **pod}, deploy, {"kind": "ServingPod", **deploy["spec"]["template"]}]:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "demo", obj["kind"]
        assert (
            labels["app.kubernetes.io/managed-by"] == "kubetune"
            and labels["app.kubernetes.io/part-of"] == "kubetune"
        )
        components[obj["kind"]] = (labels["app.kubernetes.io/name"], labels["app.kubernetes.io/component"])
    assert components == {"ConfigMap": ("kubetune-trainer", "config"), "Service": ("kubetune-trainer", "rendezvous"),
                          "Job": ("kubetune-trainer", "workload"), "PodGroup": ("kubetune-trainer", "gang"),
                          "Pod": ("kubetune-trainer", "worker"), "Deployment": ("kubetune-serving", "serving"),
                          "ServingPod": ("kubetune-serving", "serving")}  # fmt: skip
    assert deploy["spec"]["selector"]["matchLabels"] == {
        "kubetune.io/serving": "demo"
    }  # unchanged: selectors are immutable


def test_serving_deployment_pods_meet_pod_security_restricted():
    from kubetune.render.serving import render_serving

    deploy = render_serving(
        spec(serving={"kind": "Deployment", "image": "vllm", "runAsUser": 2000}),
        "demo",
        "ml",
        {"mergedModel": "s3://b/m/"},
    )
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 2000, "runAsGroup": 2000, "fsGroup": 2000,
                                      "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip
    assert pod["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def test_pods_run_as_non_root_without_privileges():
    job = render_workload(spec(), "demo", "ml")
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    sc = container(job)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False


def test_grace_period_and_termination_message():
    job = render_workload(spec(), "demo", "ml")
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 300
    longer = render_workload(spec(terminationGracePeriodSeconds=1800), "demo", "ml")
    assert longer["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 1800
    assert container(job)["terminationMessagePath"] == "/dev/termination-log"
    assert container(job)["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_pvc_uris_are_mounted_under_the_trainer_pvc_root():
    job = render_workload(spec(dataset={"train": "pvc://data/sets/train.jsonl"}), "demo", "ml")
    mounts = {m["mountPath"]: m["name"] for m in container(job)["volumeMounts"]}
    assert "/mnt/pvc/data" in mounts
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts["/mnt/pvc/data"]]["persistentVolumeClaim"] == {"claimName": "data"}


def test_user_pod_settings_pass_through():
    s = spec(
        nodeSelector={"gpu": "a100"},
        tolerations=[{"key": "gpu", "operator": "Exists"}],
        priorityClassName="high",
        schedulerName="volcano",
        serviceAccountName="trainer",
        imagePullSecrets=[{"name": "regcred"}],
        env=[{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
        volumes=[
            {"name": "cache", "mountPath": "/cache", "source": {"persistentVolumeClaim": {"claimName": "c"}}}
        ],
        labels={"team": "nlp"},
        annotations={"cost": "x"},
        image="registry/trainer:1",
    )
    job = render_workload(s, "demo", "ml", default_image="default:1")
    tmpl = job["spec"]["template"]
    pod = tmpl["spec"]
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"][0] == {"key": "gpu", "operator": "Exists"}  # then the node-loss ones
    assert {t["key"] for t in pod["tolerations"][1:]} == {
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    }
    assert (pod["priorityClassName"], pod["schedulerName"], pod["serviceAccountName"]) == (
        "high",
        "volcano",
        "trainer",
    )
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "c"}} in pod["volumes"]
    assert tmpl["metadata"]["labels"]["team"] == "nlp" and tmpl["metadata"]["annotations"] == {"cost": "x"}
    assert container(job)["image"] == "registry/trainer:1"
    assert env(job)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}


def test_default_image_applies_when_spec_has_none():
    assert container(render_workload(spec(), "demo", "ml", default_image="default:1"))["image"] == "default:1"


def test_suspend_maps_to_the_job_suspend_field():
    assert render_workload(spec(runPolicy={"suspend": True}), "demo", "ml")["spec"]["suspend"] is True


def test_kueue_queue_label_is_copied_to_the_job():
    job = render_workload(spec(), "demo", "ml", labels={LABEL_QUEUE: "team-a", "other": "x"})
    assert job["metadata"]["labels"][LABEL_QUEUE] == "team-a"
    assert "other" not in job["metadata"]["labels"]


def test_longest_allowed_name_keeps_pod_hostnames_within_63_chars():
    name = "a" * 50
    job = render_workload(spec(distributed={"nodes": 1024}), name, "ml")
    assert len(f"{job['metadata']['name']}-1023") <= 63


def test_render_all_orders_config_and_service_before_the_job():
    kinds = [o["kind"] for o in render_all(spec(), "demo", "ml")]
    assert kinds == ["ConfigMap", "Service", "Job"]


def test_tracker_and_hub_credentials_reach_the_pods_only_as_env_from_their_secrets():
    """The operator never holds a credential: the objects it renders name the Secrets and keys, never a value,
    and the ConfigMap (the trainer's config) names nothing but the Secrets."""
    tracked = spec(
        tracking={"mlflow": {"uri": "http://mlflow.mlops:5000", "experiment": "e", "credentialsSecret": "mlflow-creds"},
                  "wandb": {"project": "p", "apiKeySecret": "wandb-key"}},
        output={"uri": "s3://bucket/out", "publish": {"huggingface": {"repo": "acme/m", "tokenSecret": "hf-write"}}},
    )  # fmt: skip
    objects = render_all(tracked, "demo", "ml", "uid-1", default_image="r.example/trainer@sha256:" + "a" * 64)
    job = objects[-1]
    variables = env(job)
    assert variables["MLFLOW_TRACKING_PASSWORD"] == {
        "secretKeyRef": {"name": "mlflow-creds", "key": "MLFLOW_TRACKING_PASSWORD", "optional": True}
    }
    assert variables["MLFLOW_TRACKING_TOKEN"]["secretKeyRef"]["name"] == "mlflow-creds"
    assert variables["WANDB_API_KEY"] == {"secretKeyRef": {"name": "wandb-key", "key": "WANDB_API_KEY"}}
    assert variables["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-write", "key": "HF_TOKEN"}}
    assert (
        variables["KUBETUNE_TRAINER_IMAGE"] == "r.example/trainer@sha256:" + "a" * 64
    )  # for the model's lineage
    config_map = yaml.safe_dump(objects[0])
    for var in ("MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY", "HF_TOKEN"):
        assert var not in config_map
