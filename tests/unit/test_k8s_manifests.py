"""deploy/k8s, checked without a cluster: each overlay rendered, its core objects validated against the
Kubernetes API schemas (kubernetes-validate, strict: unknown fields are errors), its KEDA ScaledObjects
against a schema of the KEDA fields the manifests use, and the queue names KEDA watches computed by the
service's own code. The manifests were validated this way, never deployed."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from shared.model_catalog import allowed_models
from shared.queues import queue_for
from shared.settings import REPO_ROOT, Settings
from worker.cpu_budget import ThreadBudget

K8S = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
# The Kubernetes version the manifests are checked against (the newest kubernetes-validate 1.37.0 ships).
KUBERNETES_VERSION = "1.37.0"
KEDA_KINDS = {"ScaledObject"}

# The KEDA 2.x ScaledObject fields the manifests use, as KEDA documents them: a typo or a number where
# KEDA wants a string (every trigger metadata value is a string) is an error here, as it is for KEDA.
_STRING = {"type": "string", "minLength": 1}
_INT_STRING = {"type": "string", "pattern": "^[0-9]+$"}
REDIS_TRIGGER_METADATA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["listName", "listLength"],
    "oneOf": [{"required": ["address"]}, {"required": ["addressFromEnv"]}, {"required": ["host", "port"]}, {"required": ["hostFromEnv", "portFromEnv"]}],
    "properties": {
        "address": _STRING, "addressFromEnv": _STRING, "host": _STRING, "hostFromEnv": _STRING, "port": _INT_STRING, "portFromEnv": _STRING,
        "passwordFromEnv": _STRING, "usernameFromEnv": _STRING, "databaseIndex": _INT_STRING, "enableTLS": {"enum": ["true", "false"]},
        "listName": _STRING, "listLength": _INT_STRING, "activationListLength": _INT_STRING,
    },
}
SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"], "properties": {"name": _STRING, "namespace": _STRING, "labels": {"type": "object"}}},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object", "additionalProperties": False, "required": ["name"],
                    "properties": {"name": _STRING, "kind": _STRING, "apiVersion": _STRING, "envSourceContainerName": _STRING},
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "triggers": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "additionalProperties": False, "required": ["type", "metadata"],
                        "properties": {"type": {"const": "redis"}, "name": _STRING, "metadata": REDIS_TRIGGER_METADATA},
                    },
                },
            },
        },
    },
}


# --- a renderer for the subset of kustomize the manifests use ---------------------------------------

def _json_pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.lstrip("/").split("/")]


def _apply_json_patch(document: dict[str, Any], operations: list[dict[str, Any]]) -> None:
    for operation in operations:
        *parents, last = _json_pointer(operation["path"])
        node: Any = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        op = operation["op"]
        if isinstance(node, list):
            if op == "add":
                node.insert(len(node) if last == "-" else int(last), copy.deepcopy(operation["value"]))
            elif op == "replace":
                node[int(last)] = copy.deepcopy(operation["value"])
            else:
                assert op == "remove", op
                del node[int(last)]
        elif op in ("add", "replace"):
            assert op == "add" or last in node, operation
            node[last] = copy.deepcopy(operation["value"])
        else:
            assert op == "remove", op
            del node[last]


def _matches(document: dict[str, Any], target: dict[str, str]) -> bool:
    if "kind" in target and document["kind"] != target["kind"]:
        return False
    if "name" in target and document["metadata"]["name"] != target["name"]:
        return False
    labels = document["metadata"].get("labels", {})
    for term in filter(None, target.get("labelSelector", "").split(",")):
        key, _, value = term.partition("=")
        if labels.get(key.strip()) != value.strip():
            return False
    return True


def _pod_containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    spec = document.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def render(directory: Path) -> list[dict[str, Any]]:
    """What ``kustomize build`` makes of a directory using resources, labels (metadata only),
    namespace, images (newName/newTag) and JSON 6902 patches: the only features the manifests use."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "resources", "labels", "namespace", "images", "patches"}
    assert set(kustomization) <= known, f"{directory}: the test's renderer does not handle {set(kustomization) - known}"
    documents: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        documents += render(path) if path.is_dir() else [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in kustomization.get("patches", []):
        operations = yaml.safe_load(patch["patch"])
        targets = [doc for doc in documents if _matches(doc, patch["target"])]
        assert targets, f"{directory}: patch target {patch['target']} matches nothing"
        for document in targets:
            _apply_json_patch(document, operations)
    for document in documents:
        metadata = document["metadata"]
        if "namespace" in kustomization:
            metadata["namespace"] = kustomization["namespace"]
        for label in kustomization.get("labels", []):
            assert set(label) == {"pairs"}, "only metadata labels are rendered"
            metadata.setdefault("labels", {}).update(label["pairs"])
        for image in kustomization.get("images", []):
            for container in _pod_containers(document):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}".rstrip(":")
    return documents


# --- helpers over a rendered overlay ------------------------------------------------------------------

def _by_kind(documents: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == kind}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _env(documents: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, Any]:
    """The container's environment: its ConfigMaps' data, then its own env entries (which win)."""
    config_maps = _by_kind(documents, "ConfigMap")
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]]["data"])
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return env


def _workers(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: doc for name, doc in _by_kind(documents, "Deployment").items() if doc["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"}


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(K8S / "overlays" / request.param)


def test_core_objects_are_valid_kubernetes(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, documents = overlay
    core = [doc for doc in documents if doc["kind"] not in KEDA_KINDS]
    assert {doc["kind"] for doc in core} == {"ConfigMap", "Service", "Deployment", "StatefulSet"}
    for document in core:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        assert document["metadata"]["namespace"] == "imbeddings"
    print(f"\n{name}: {len(core)} core objects valid for Kubernetes {KUBERNETES_VERSION} (strict)")


def test_an_invalid_object_is_caught() -> None:
    """The validation above can fail: a misspelt field in a worker is an error."""
    _, documents = "cpu", render(K8S / "overlays" / "cpu")
    worker = copy.deepcopy(next(iter(_workers(documents).values())))
    _container(worker)["readinessProbes"] = _container(worker).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, KUBERNETES_VERSION, strict=True)
    scaled = copy.deepcopy(next(iter(_by_kind(documents, "ScaledObject").values())))
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 16
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, SCALED_OBJECT_SCHEMA)


def test_every_worker_is_scaled_by_keda_on_its_models_queues(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, documents = overlay
    workers = _workers(documents)
    scaled_objects = _by_kind(documents, "ScaledObject")
    config = _by_kind(documents, "ConfigMap")["imbeddings"]["data"]
    redis_url = urlsplit(config["IMBEDDINGS_REDIS_URL"])
    allowed = allowed_models(REPO_ROOT / "supported_models.txt", config["IMBEDDINGS_DEFAULT_MODEL"])
    # KEDA allows one ScaledObject per workload: one per worker Deployment, covering all its queues.
    assert sorted(so["spec"]["scaleTargetRef"]["name"] for so in scaled_objects.values()) == sorted(workers)
    minimum_for = {}
    for scaled in scaled_objects.values():
        jsonschema.validate(scaled, SCALED_OBJECT_SCHEMA)
        worker = workers[scaled["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in worker["spec"], "KEDA owns the replica count; an applied one would fight it"
        env = _env(documents, _container(worker))
        models = env["IMBEDDINGS_WORKER_MODELS"].split(",")
        assert set(models) <= set(allowed)
        lists = {}
        for trigger in scaled["spec"]["triggers"]:
            metadata = trigger["metadata"]
            # KEDA reads the address from the worker's own environment: the Redis the worker uses.
            assert env[metadata["addressFromEnv"]] == redis_url.netloc
            assert metadata["databaseIndex"] == redis_url.path.strip("/")
            lists[trigger["name"]] = metadata["listName"]
        bulk_only = "interactive" not in lists
        assert lists == {kind: queue_for(model, kind) for model in models for kind in ("interactive", "bulk") if kind in lists}
        assert "bulk" in lists
        # The API refuses interactive work for a model no worker serves, so only a bulk-only model may
        # scale to zero: its jobs wait in the bulk list, and their first chunk starts a worker.
        assert scaled["spec"].get("minReplicaCount", 1) == (0 if bulk_only else 1), scaled["metadata"]["name"]
        for model in models:
            minimum_for[model] = scaled["spec"].get("minReplicaCount", 1)
    assert minimum_for[config["IMBEDDINGS_DEFAULT_MODEL"]] >= 1, "/ready needs a worker for the default model"
    assert 0 in minimum_for.values(), "the manifests show a bulk-only model scaled to zero"


def test_queue_names_cli_prints_what_keda_watches() -> None:
    scaled_objects = _by_kind(render(K8S / "overlays" / "cpu"), "ScaledObject").values()
    workers = _workers(render(K8S / "overlays" / "cpu"))
    for scaled in scaled_objects:
        env = {e["name"]: e.get("value") for e in _container(workers[scaled["spec"]["scaleTargetRef"]["name"]]).get("env", [])}
        for trigger in scaled["spec"]["triggers"]:
            printed = subprocess.run(
                [sys.executable, "-m", "shared.queues", "--kind", trigger["name"], env["IMBEDDINGS_WORKER_MODELS"]],
                cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True,
            ).stdout.strip()
            assert printed == trigger["metadata"]["listName"]


def test_probes_use_health_ready_and_the_worker_announcement(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, documents = overlay
    api = _container(_by_kind(documents, "Deployment")["imbeddings-api"])
    assert api["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert api["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert {"name": "http", "containerPort": 8000} in api["ports"]
    assert _env(documents, api)["IMBEDDINGS_PORT"] == "8000"
    for worker in _workers(documents).values():
        container = _container(worker)
        for probe, check in (("startupProbe", "ready"), ("readinessProbe", "ready"), ("livenessProbe", "alive")):
            assert container[probe]["exec"]["command"] == ["python", "-m", "worker.probe", check]
            # The probe's Redis client waits up to 5 s to connect and 15 s for an answer.
            assert container[probe]["timeoutSeconds"] > 20
        # Model downloads happen before the worker is ready: the startup probe allows 15 minutes.
        assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 900
        metrics_port = int(worker["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"])
        assert {"name": "metrics", "containerPort": metrics_port} in container["ports"]
        assert metrics_port == Settings.model_fields["worker_metrics_port"].default
        assert _env(documents, container)["IMBEDDINGS_WORKER_METRICS_HOST"] == "0.0.0.0"
        # Warm shutdown needs time to finish the batch and hand the rest back.
        assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60


def test_cpu_workers_have_the_thread_budget_of_their_limit() -> None:
    documents = render(K8S / "overlays" / "cpu")
    for worker in _workers(documents).values():
        container = _container(worker)
        env = _env(documents, container)
        cpus = int(container["resources"]["limits"]["cpu"])
        assert container["resources"]["requests"] == container["resources"]["limits"], "Guaranteed QoS"
        assert "nvidia.com/gpu" not in container["resources"]["limits"] and env["IMBEDDINGS_DEVICE"] == "cpu"
        budget = ThreadBudget.for_cpus(cpus, "cpu", Settings(torch_threads=None, preprocess_threads=None))
        assert env["IMBEDDINGS_TORCH_THREADS"] == {"resourceFieldRef": {"containerName": "worker", "resource": "limits.cpu", "divisor": "1"}}
        assert int(env["IMBEDDINGS_PREPROCESS_THREADS"]) == budget.preprocess_threads
        assert container["image"] == "imbeddings-worker:1.0.0-cpu"


def test_gpu_workers_get_one_gpu_each() -> None:
    documents = render(K8S / "overlays" / "gpu")
    for worker in _workers(documents).values():
        container = _container(worker)
        env = _env(documents, container)
        limits = container["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1" and container["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert env["IMBEDDINGS_DEVICE"] == "cuda"
        # The whole GPU is the worker's: no memory fraction; the device plugin sets CUDA_VISIBLE_DEVICES.
        assert "IMBEDDINGS_CUDA_MEMORY_FRACTION" not in env and "CUDA_VISIBLE_DEVICES" not in env
        limit_cpus = {"resourceFieldRef": {"containerName": "worker", "resource": "limits.cpu", "divisor": "1"}}
        # On CUDA every CPU of the worker decodes and preprocesses (ThreadBudget's CUDA rule), here of its limit.
        assert env["IMBEDDINGS_PREPROCESS_THREADS"] == limit_cpus and env["IMBEDDINGS_TORCH_THREADS"] == limit_cpus
        assert ThreadBudget.for_cpus(8, "cuda", Settings(torch_threads=None, preprocess_threads=None)).preprocess_threads == int(limits["cpu"])
        spec = worker["spec"]["template"]["spec"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert container["image"] == "imbeddings-worker:1.0.0-cu130"
    for name, deployment in _by_kind(documents, "Deployment").items():
        if name not in _workers(documents):
            assert "nvidia.com/gpu" not in str(deployment), name


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
@pytest.mark.parametrize("name", OVERLAYS)
def test_the_renderer_agrees_with_kustomize(name: str) -> None:
    built = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / name)], capture_output=True, text=True, timeout=120, check=True).stdout
    by_key = {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(built) if doc}
    assert by_key == {(doc["kind"], doc["metadata"]["name"]): doc for doc in render(K8S / "overlays" / name)}


def test_flower_watches_the_same_broker_behind_credentials(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, documents = overlay
    flower = _container(_by_kind(documents, "Deployment")["imbeddings-flower"])
    env = _env(documents, flower)
    assert env["CELERY_BROKER_URL"] == {"configMapKeyRef": {"name": "imbeddings", "key": "IMBEDDINGS_REDIS_URL"}}
    assert env["FLOWER_BASIC_AUTH"] == {"secretKeyRef": {"name": "imbeddings-flower", "key": "FLOWER_BASIC_AUTH"}}
    assert flower["args"][:2] == ["celery", "flower"] and "--inspect_timeout=10000" in flower["args"]
    assert flower["livenessProbe"]["httpGet"]["path"] == "/healthcheck"
