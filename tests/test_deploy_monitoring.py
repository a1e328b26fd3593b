"""Monitoring as deployed: every Kubernetes manifest validates against the Kubernetes API's schemas
(kubernetes-validate; KEDA's objects by their own shape), Prometheus and Alertmanager are wired the
same way in compose and Kubernetes, and a central Prometheus can sit beside the compose stack."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy import CENTRAL, COMPOSE, K8S, MAIN, config, manifests, of_kind, only_container, workloads

KEDA = {"ScaledObject"}
"""Kinds of KEDA's CRDs, whose schemas kubernetes-validate does not have."""


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_validates(doc: dict[str, Any]) -> None:
    if doc["kind"] in KEDA:
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        target = doc["spec"]["scaleTargetRef"]["name"]
        assert target in {w["metadata"]["name"] for w in of_kind("Deployment")}
        assert doc["spec"]["triggers"] and all(
            {"type", "metadata"} <= set(t) for t in doc["spec"]["triggers"]
        )
        return
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_k8s_prometheus_labels_its_cluster_and_alerts_the_alertmanager() -> None:
    env = next(d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "gptoss-env")["data"]
    assert env["GPTOSS_CLUSTER"] and env["GPTOSS_REGION"]
    prometheus = only_container("prometheus")
    assert {"configMapRef": {"name": "gptoss-env"}} in prometheus["envFrom"]  # its external labels
    assert "--enable-feature=exemplar-storage,expand-external-labels" in prometheus["args"]
    config = yaml.safe_load((K8S / "prometheus.yml").read_text())
    ((target,),) = [g["targets"] for g in config["alerting"]["alertmanagers"][0]["static_configs"]]
    host, port = target.split(":")
    service = next(s for s in of_kind("Service") if s["metadata"]["name"] == host.split(".")[0])
    assert host == f"{service['metadata']['name']}.gptoss.svc.cluster.local"
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}


def test_k8s_alertmanager_runs_the_compose_config() -> None:
    kustomization = yaml.safe_load((COMPOSE / "kustomization.yaml").read_text())
    generated = {g["name"]: g["files"] for g in kustomization["configMapGenerator"]}
    assert generated["alertmanager-config"] == ["alertmanager/alertmanager.yml"]
    assert "prometheus/rules/sla.yml" in generated["prometheus-rules"]
    (manager,) = [w for w in workloads() if w["metadata"]["name"] == "alertmanager"]
    volumes = {v["name"]: v for v in manager["spec"]["template"]["spec"]["volumes"]}
    container = only_container("alertmanager")
    (mount,) = [m for m in container["volumeMounts"] if volumes[m["name"]].get("configMap")]
    assert volumes[mount["name"]]["configMap"]["name"] == "alertmanager-config"
    assert f"--config.file={mount['mountPath']}/alertmanager.yml" in container["args"]
    compose = config(MAIN)["services"]["alertmanager"]
    assert (
        container["image"] == compose["image"]
        and f"--config.file={mount['mountPath']}/alertmanager.yml" in (compose["command"])
    )


def test_compose_prometheus_alerts_the_compose_alertmanager() -> None:
    services = config(MAIN)["services"]
    prometheus = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())
    ((target,),) = [g["targets"] for g in prometheus["alerting"]["alertmanagers"][0]["static_configs"]]
    assert target == "alertmanager:9093"
    assert any(p["target"] == 9093 for p in services["alertmanager"]["ports"])
    (mounted,) = [v for v in services["alertmanager"]["volumes"] if v["target"] == "/etc/alertmanager"]
    assert mounted["source"].endswith("compose/alertmanager") and mounted["read_only"]


def test_the_central_prometheus_federates_the_stack_and_grafana_reads_it() -> None:
    services = config(MAIN, CENTRAL)["services"]
    central = services["prometheus-central"]
    assert "--config.file=/etc/prometheus/central.yml" in central["command"]
    (mounted,) = [v for v in central["volumes"] if v["target"] == "/etc/prometheus/central.yml"]
    assert mounted["source"].endswith("compose/prometheus/central.yml")
    jobs = yaml.safe_load((COMPOSE / "prometheus" / "central.yml").read_text())["scrape_configs"]
    federate = next(j for j in jobs if j["job_name"] == "federate")
    assert federate["static_configs"][0]["targets"] == ["prometheus:9090"]
    assert (
        services["grafana"]["environment"]["GPTOSS_GRAFANA_PROMETHEUS_URL"]
        == "http://prometheus-central:9090"
    )
    assert config(MAIN)["services"]["grafana"]["environment"]["GPTOSS_GRAFANA_PROMETHEUS_URL"] == (
        "http://prometheus:9090"
    )
