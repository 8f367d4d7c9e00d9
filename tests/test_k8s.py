"""The Kubernetes manifests (deploy/k8s): each overlay rendered by kustomize (through
``kubectl kustomize``) and every object validated against the Kubernetes schemas that
kubernetes-validate ships, strictly (an unknown field is an error); then what an
operator relies on: probes on the service's real endpoints, non-root and a read-only
root filesystem, the store mounted read-only, a GPU per pod in the gpu overlay."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.main import create_app
from service.settings import Settings

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
KUBE_VERSION = "1.30.0"  # the oldest version the manifests target; newer ones also pass

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (for its built-in kustomize) is not installed"
)


def render(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def routes() -> set[str]:
    """The service's paths, as its OpenAPI document lists them."""
    app = create_app(Settings(models=[], redis_url=None, docs=True))
    return set(app.openapi()["paths"])


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
@pytest.mark.parametrize("version", [KUBE_VERSION, kubernetes_validate.latest_version()])
def test_every_object_of_each_overlay_validates(overlay: str, version: str) -> None:
    objs = render(overlay)
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted(
        ["Deployment", "Deployment", "Service", "Service", "HorizontalPodAutoscaler",
         "PodDisruptionBudget", "PersistentVolumeClaim"]
    )  # fmt: skip
    for obj in objs:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_the_api_pods_are_probed_locked_down_and_read_the_store(overlay: str) -> None:
    objs = render(overlay)
    api = by_kind(objs, "Deployment", "protopnet-api")
    pod = api["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    paths = routes()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] in paths, probe
        assert c[probe]["httpGet"]["port"] in {p["name"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["store"]["readOnly"] is True and mounts["store"]["mountPath"] == "/store"
    claim = {v["name"]: v for v in pod["volumes"]}["store"]["persistentVolumeClaim"]
    assert claim == {"claimName": "protopnet-store", "readOnly": True}
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["PROTOPNET_STORE"] == "/store"
    # The env names are real settings (a typo would be silently ignored by the service).
    fields = {f"PROTOPNET_{k.upper()}" for k in Settings.model_fields}
    assert set(env) <= fields, set(env) - fields
    assert env["PROTOPNET_DEVICE"] == ("cuda" if overlay == "gpu" else "cpu")
    assert env["PROTOPNET_REDIS_URL"].startswith("redis://protopnet-redis:")
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > Settings.model_fields["graceful_shutdown_s"].default
    gpu = c["resources"]["requests"].get("nvidia.com/gpu")
    if overlay == "gpu":
        assert gpu == 1 and c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["nodeSelector"]
    else:
        assert gpu is None and "tolerations" not in pod
    svc = by_kind(objs, "Service", "protopnet-api")
    assert svc["spec"]["selector"] == api["spec"]["selector"]["matchLabels"]
    hpa = by_kind(objs, "HorizontalPodAutoscaler", "protopnet-api")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "protopnet-api"
    pdb = by_kind(objs, "PodDisruptionBudget", "protopnet-api")
    assert pdb["spec"]["selector"]["matchLabels"] == api["spec"]["selector"]["matchLabels"]


def test_the_kserve_service_runs_the_same_image_and_routes() -> None:
    """KServe's CRD schema is not in kubernetes-validate; the InferenceService is checked
    against the Deployment it mirrors and the routes KServe's v1 protocol calls."""
    isvc = yaml.safe_load((K8S / "kserve" / "inferenceservice.yaml").read_text())
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    (c,) = isvc["spec"]["predictor"]["containers"]
    api = by_kind(render("cpu"), "Deployment", "protopnet-api")["spec"]["template"]["spec"]
    assert c["image"] == api["containers"][0]["image"]
    base_env = {e["name"]: e["value"] for e in api["containers"][0]["env"]}
    env = {e["name"]: e["value"] for e in c["env"]}
    assert {k: base_env[k] for k in env} == env
    assert c["readinessProbe"]["httpGet"]["path"] in routes()
    assert {"/v1/models/{name}:predict", "/v1/models/{name}:explain"} <= routes()
    # Its container is a plain container spec: validate it as one inside a Pod.
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"},
        "spec": {"containers": [c], "volumes": isvc["spec"]["predictor"]["volumes"]},
    }  # fmt: skip
    kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
