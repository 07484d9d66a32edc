"""The Kubernetes manifests (k8s/): every overlay renders, validates against the API schemas, and has
the settings the services rely on. All checks read the rendered YAML (`kubectl kustomize`), not the
source files, so overlays, components and patches are checked as the cluster would receive them.

Needs kubectl (kustomize built in; skipped without it), kubernetes-validate and PyYAML.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
OVERLAYS = ["gpu", "cpu-only", "dev"]
TLS_OVERLAYS = ["gpu", "cpu-only"]
CPU_OVERLAYS = ["cpu-only", "dev"]
# Schemas of this Kubernetes version (kubernetes-validate ships 1.x schema sets; 1.32 is kubectl's).
KUBE_VERSION = "1.32.0"
# The verifier's documented model-load allowance (k8s/README.md): its startup probe must allow this.
VERIFY_MODEL_LOAD_ALLOWANCE_S = 600
# Besides DUO_DRAFT_VERIFY_WAIT_S, the drafter's own model load (conversion on first start ~60 s).
DRAFT_MODEL_LOAD_ALLOWANCE_S = 60
GPU = "nvidia.com/gpu"
SERVICES = {"verify": "duo-verify", "draft": "duo-draft"}
ENV_PREFIX = {"verify": "DUO_VERIFY", "draft": "DUO_DRAFT"}


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl not found on PATH: install kubectl >= 1.27 (kustomize built in) to render k8s/")
    return path


@functools.lru_cache(maxsize=None)
def _render_dir(directory: str) -> tuple:
    result = subprocess.run([_kubectl(), "kustomize", directory], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    docs = tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)
    assert docs, f"{directory} rendered nothing"
    return docs


def render(overlay: str) -> list[dict]:
    return list(_render_dir(str(K8S / "overlays" / overlay)))


# ───────────────────────────── helpers on rendered objects ─────────────────────────────


def objects(docs, kind):
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs, kind, name):
    found = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def deployment(docs, component):
    return one(docs, "Deployment", SERVICES[component])


def main_container(dep):
    containers = dep["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{dep['metadata']['name']}: expected one container"
    return containers[0]


def all_containers(dep):
    spec = dep["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def container_env(docs, container) -> dict[str, str]:
    """The environment the container gets: envFrom ConfigMaps, then env (which wins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"unexpected envFrom source {source}"
        env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


def rendered_service(overlay: str, component: str) -> tuple[dict, dict, dict[str, str]]:
    """A component's Deployment in the rendered overlay, its main container and that container's environment."""
    docs = render(overlay)
    dep = deployment(docs, component)
    container = main_container(dep)
    return dep, container, container_env(docs, container)


def ports_by_name(container) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def cpu_cores(quantity) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def selector_matches(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) against a label set; {} matches everything."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pod_labels(dep) -> dict:
    return dep["spec"]["template"]["metadata"]["labels"]


def probe_port(container) -> int:
    """The health port the probes must use: 'grpc-health' (plaintext health) with TLS, else 'grpc'."""
    ports = ports_by_name(container)
    return ports["grpc-health"] if "grpc-health" in ports else ports["grpc"]


def tls_on(env: dict, prefix: str) -> bool:
    return f"{prefix}_TLS_CERT" in env


def overlay_param():
    return pytest.mark.parametrize("overlay", OVERLAYS)


# ───────────────────────────── rendering and schema validation ─────────────────────────────


@overlay_param()
def test_overlay_renders_and_validates_against_the_api_schemas(overlay):
    docs = render(overlay)
    kinds = {doc["kind"] for doc in docs}
    for kind in ["Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                 "NetworkPolicy", "ServiceAccount"]:
        assert kind in kinds, f"{overlay}: no {kind} rendered"
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {name} is not a valid {KUBE_VERSION} object: {exc.message} at {list(exc.path)}")


@overlay_param()
def test_no_secret_values_are_rendered(overlay):
    assert objects(render(overlay), "Secret") == [], "Secrets are created by the operator, never shipped"


@overlay_param()
def test_labels(overlay):
    docs = render(overlay)
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "duo", f"{doc['kind']}/{doc['metadata']['name']}"
    for component, name in SERVICES.items():
        dep = deployment(docs, component)
        for labels in (dep["metadata"]["labels"], pod_labels(dep)):
            assert labels["app.kubernetes.io/name"] == name
            assert labels["app.kubernetes.io/component"] == component
            assert labels["app.kubernetes.io/part-of"] == "duo"
        assert selector_matches(dep["spec"]["selector"], pod_labels(dep))


@overlay_param()
def test_every_referenced_configmap_exists_and_volumes_have_one_source(overlay):
    docs = render(overlay)
    for dep in objects(docs, "Deployment"):
        for container in all_containers(dep):
            container_env(docs, container)  # asserts each envFrom ConfigMap is rendered
        for volume in dep["spec"]["template"]["spec"]["volumes"]:
            sources = set(volume) - {"name"}
            assert len(sources) == 1, f"{overlay}: volume {volume['name']} has sources {sources}"
        mounts = {m["name"] for c in all_containers(dep) for m in c.get("volumeMounts", [])}
        volumes = {v["name"] for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert mounts <= volumes, f"{overlay}: mounts without a volume: {mounts - volumes}"


# ───────────────────────────── ports and probes ─────────────────────────────


@overlay_param()
@pytest.mark.parametrize("component", ["verify", "draft"])
def test_grpc_probes_target_the_containers_grpc_health_port(overlay, component):
    _, container, env = rendered_service(overlay, component)
    prefix = ENV_PREFIX[component]
    ports = ports_by_name(container)
    assert int(env[f"{prefix}_PORT"]) == ports["grpc"], "the server's --port must be the container's grpc port"
    if tls_on(env, prefix):
        # The kubelet's gRPC probe cannot speak TLS: probes go to the plaintext health-only port.
        assert "grpc-health" in ports, f"{overlay}/{component}: TLS on but no plaintext grpc-health port"
        assert int(env[f"{prefix}_HEALTH_PORT"]) == ports["grpc-health"] != ports["grpc"]
        expected = ports["grpc-health"]
    else:
        assert "grpc-health" not in ports and f"{prefix}_HEALTH_PORT" not in env
        expected = ports["grpc"]
    assert probe_port(container) == expected
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in container, f"{overlay}/{component}: no {probe}"
        assert set(container[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, \
            f"{probe} must be a grpc probe (grpc.health.v1)"
        assert container[probe]["grpc"]["port"] == expected, f"{overlay}/{component}: {probe} port"
        assert container[probe]["grpc"].get("service", "") == "", "the overall status ('') is what turns SERVING"


@overlay_param()
def test_startup_probe_allows_for_model_loading(overlay):
    docs = render(overlay)

    def budget(container):
        probe = container["startupProbe"]
        return probe.get("failureThreshold", 3) * probe.get("periodSeconds", 10) + probe.get("initialDelaySeconds", 0)

    verify = main_container(deployment(docs, "verify"))
    assert budget(verify) >= VERIFY_MODEL_LOAD_ALLOWANCE_S
    draft = main_container(deployment(docs, "draft"))
    wait_s = float(container_env(docs, draft)["DUO_DRAFT_VERIFY_WAIT_S"])
    assert budget(draft) >= wait_s + DRAFT_MODEL_LOAD_ALLOWANCE_S, \
        "a drafter turns SERVING only after the verifiers answer (DUO_DRAFT_VERIFY_WAIT_S)"
    for container in (verify, draft):
        # Liveness must not kill a busy-but-healthy server on one slow answer.
        live = container["livenessProbe"]
        assert live.get("failureThreshold", 3) * live.get("periodSeconds", 10) >= 30


@overlay_param()
@pytest.mark.parametrize("component", ["verify", "draft"])
def test_metrics_port_and_scrape_annotations(overlay, component):
    dep, container, env = rendered_service(overlay, component)
    metrics_port = ports_by_name(container)["metrics"]
    assert int(env[f"{ENV_PREFIX[component]}_METRICS_PORT"]) == metrics_port
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"


# ───────────────────────────── Services and the verifier address ─────────────────────────────


def _services_selecting(docs, dep):
    return [svc for svc in objects(docs, "Service")
            if svc["spec"].get("selector") and selector_matches({"matchLabels": svc["spec"]["selector"]}, pod_labels(dep))]


@overlay_param()
def test_drafters_reach_verifiers_through_the_headless_service_with_client_side_balancing(overlay):
    docs = render(overlay)
    verify = deployment(docs, "verify")
    draft_env = container_env(docs, main_container(deployment(docs, "draft")))
    match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", draft_env["DUO_DRAFT_VERIFY_ADDR"])
    assert match, f"verify address must be dns:///<headless service>:<port>, got {draft_env['DUO_DRAFT_VERIFY_ADDR']}"
    svc = one(docs, "Service", match.group(1))
    assert svc["spec"]["clusterIP"] == "None", "the verify Service must be headless (per-pod DNS records)"
    assert svc in _services_selecting(docs, verify)
    assert not svc["spec"].get("publishNotReadyAddresses", False), "loading/draining verifiers must stay out of DNS"
    port = next(p for p in svc["spec"]["ports"] if p["port"] == int(match.group(2)))
    assert port["targetPort"] in ("grpc", ports_by_name(main_container(verify))["grpc"])
    # No ClusterIP Service for the verifiers: connection-level balancing would pin each drafter to one.
    for svc in _services_selecting(docs, verify):
        assert svc["spec"].get("clusterIP") == "None"


@overlay_param()
def test_drafters_have_a_clusterip_and_a_headless_service(overlay):
    docs = render(overlay)
    draft = deployment(docs, "draft")
    grpc_port = ports_by_name(main_container(draft))["grpc"]
    services = _services_selecting(docs, draft)
    cluster_ip = [s for s in services if s["spec"].get("clusterIP") != "None"]
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    assert [s["metadata"]["name"] for s in cluster_ip] == ["duo-draft"]
    assert cluster_ip[0]["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert [s["metadata"]["name"] for s in headless] == ["duo-draft-headless"]
    for svc in services:
        grpc_ports = [port for port in svc["spec"]["ports"] if port["name"] == "grpc"]
        assert len(grpc_ports) == 1 and grpc_ports[0]["targetPort"] in ("grpc", grpc_port)
    assert [port["name"] for port in headless[0]["spec"]["ports"]] == ["grpc"]  # gRPC callers' round robin


@overlay_param()
def test_the_drafters_http_api_has_a_named_port_on_the_clusterip_service(overlay):
    docs = render(overlay)
    draft = deployment(docs, "draft")
    container = main_container(draft)
    http_port = ports_by_name(container)["http"]
    assert int(container_env(docs, container)["DUO_DRAFT_HTTP_PORT"]) == http_port
    (cluster_ip,) = [s for s in _services_selecting(docs, draft) if s["spec"].get("clusterIP") != "None"]
    (port,) = [port for port in cluster_ip["spec"]["ports"] if port["name"] == "http"]
    assert port["targetPort"] in ("http", http_port)
    policy = one(docs, "NetworkPolicy", "duo-draft")
    open_rules = [_rule_ports(rule, container) for rule in policy["spec"]["ingress"] if not rule.get("from")]
    assert any(ports is None or http_port in ports for ports in open_rules), "anyone in the cluster may call it"


@overlay_param()
def test_service_links_are_off(overlay):
    # Service env links (DUO_DRAFT_PORT=tcp://...) would collide with the DUO_* flag variables.
    docs = render(overlay)
    for dep in objects(docs, "Deployment"):
        assert dep["spec"]["template"]["spec"].get("enableServiceLinks") is False


# ───────────────────────────── GPU / CPU overlays ─────────────────────────────


def test_gpu_overlay_requests_a_gpu_and_mounts_dev_shm():
    docs = render("gpu")
    dep = deployment(docs, "verify")
    spec = dep["spec"]["template"]["spec"]
    container = main_container(dep)
    assert str(container["resources"]["limits"][GPU]) == "1"
    assert str(container["resources"].get("requests", {}).get(GPU, "1")) == "1"
    shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert len(shm) == 1
    volume = next(v for v in spec["volumes"] if v["name"] == shm[0]["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
    assert spec["nodeSelector"], "GPU nodes are selected"
    assert any(t.get("key") == GPU and t.get("effect") == "NoSchedule" for t in spec["tolerations"])
    assert container_env(docs, container)["DUO_VERIFY_DEVICE"] == "cuda"
    assert "command" not in container, "the CUDA image's entry point (duo-verify serve) runs"
    assert "duo-verify" in container["image"]
    # The drafters stay on CPU.
    draft = main_container(deployment(docs, "draft"))
    assert GPU not in draft["resources"].get("limits", {}) and GPU not in draft["resources"].get("requests", {})


@pytest.mark.parametrize("overlay", CPU_OVERLAYS)
def test_cpu_overlays_request_no_gpu_and_run_the_verifier_on_cpu(overlay):
    docs = render(overlay)
    for dep in objects(docs, "Deployment"):
        spec = dep["spec"]["template"]["spec"]
        for container in all_containers(dep):
            for section in ("limits", "requests"):
                assert GPU not in container.get("resources", {}).get(section, {}), f"{overlay}: GPU requested"
        assert not any(t.get("key") == GPU for t in spec.get("tolerations", []))
        assert "nvidia.com/gpu.present" not in spec.get("nodeSelector", {})
    verify = main_container(deployment(docs, "verify"))
    assert container_env(docs, verify)["DUO_VERIFY_DEVICE"] == "cpu"
    # The CPU image's entry point is duo-draft: the verifier must be started explicitly.
    assert verify["command"] == ["duo-verify", "serve"]
    assert verify["image"] == main_container(deployment(docs, "draft"))["image"]


@overlay_param()
@pytest.mark.parametrize("component", ["verify", "draft"])
def test_torch_threads_equal_the_cpu_limit(overlay, component):
    _, container, env = rendered_service(overlay, component)
    limit = cpu_cores(container["resources"]["limits"]["cpu"])
    assert limit == int(limit) and limit >= 1, "whole CPUs, so the thread count can match"
    assert int(env[f"{ENV_PREFIX[component]}_THREADS"]) == int(limit)
    assert container["resources"]["requests"]["memory"], "memory requested"
    assert container["resources"]["limits"]["memory"], "memory limited"


# ───────────────────────────── shutdown, disruption, scaling ─────────────────────────────


@overlay_param()
@pytest.mark.parametrize("component", ["verify", "draft"])
def test_termination_grace_outlasts_the_drain(overlay, component):
    dep, container, env = rendered_service(overlay, component)
    grace_s = float(env[f"{ENV_PREFIX[component]}_GRACE_S"])
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    pre_stop_s = 0.0
    if "exec" in pre_stop:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep"
        pre_stop_s = float(command[1])
    elif "sleep" in pre_stop:
        pre_stop_s = float(pre_stop["sleep"]["seconds"])
    termination = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert termination > grace_s + pre_stop_s, \
        f"terminationGracePeriodSeconds {termination} must exceed preStop {pre_stop_s} + --grace-s {grace_s}"


@overlay_param()
def test_each_deployment_has_a_pdb_that_selects_its_pods(overlay):
    docs = render(overlay)
    pdbs = objects(docs, "PodDisruptionBudget")
    deployments = objects(docs, "Deployment")
    for pdb in pdbs:
        selected = [d for d in deployments if selector_matches(pdb["spec"]["selector"], pod_labels(d))]
        assert len(selected) == 1, f"PDB {pdb['metadata']['name']} selects {len(selected)} Deployments"
        assert pdb["spec"]["selector"].get("matchLabels"), "an empty selector would select every pod"
        # maxUnavailable 1: drains proceed one pod at a time, even with a single replica.
        assert pdb["spec"].get("maxUnavailable") == 1
    for dep in deployments:
        assert any(selector_matches(p["spec"]["selector"], pod_labels(dep)) for p in pdbs), \
            f"no PDB for {dep['metadata']['name']}"


@overlay_param()
def test_hpa_scales_the_draft_deployment_on_cpu(overlay):
    docs = render(overlay)
    (hpa,) = objects(docs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    draft = deployment(docs, "draft")
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", draft["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    assert "replicas" not in draft["spec"], "the HPA owns the draft replica count"
    assert main_container(draft)["resources"]["requests"]["cpu"], "utilisation is relative to the CPU request"


# ───────────────────────────── network policy ─────────────────────────────


def _rule_ports(rule, container) -> set[int] | None:
    """Numeric ports a rule admits on this container (None: every port)."""
    if not rule.get("ports"):
        return None
    named = ports_by_name(container)
    return {named[p["port"]] if isinstance(p["port"], str) else p["port"] for p in rule["ports"]}


@overlay_param()
def test_only_drafters_reach_the_verifiers_grpc_port(overlay):
    docs = render(overlay)
    verify = deployment(docs, "verify")
    draft = deployment(docs, "draft")
    container = main_container(verify)
    grpc_port = ports_by_name(container)["grpc"]
    policies = [p for p in objects(docs, "NetworkPolicy") if selector_matches(p["spec"]["podSelector"], pod_labels(verify))]
    assert policies, "no NetworkPolicy selects the verify pods"
    # Policies add up: every rule of every policy that selects the verifiers is checked.
    admitting_drafters = 0
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
        assert policy["spec"]["podSelector"].get("matchLabels"), "must select the verify pods, not all pods"
        for rule in policy["spec"].get("ingress", []):
            ports = _rule_ports(rule, container)
            if ports is not None and grpc_port not in ports:
                continue
            peers = rule.get("from")
            assert peers, f"{policy['metadata']['name']}: a rule admits everyone to the verifiers' gRPC port"
            for peer in peers:
                assert set(peer) == {"podSelector"}, f"only same-namespace draft pods, got {peer}"
                assert peer["podSelector"].get("matchLabels") or peer["podSelector"].get("matchExpressions")
                assert selector_matches(peer["podSelector"], pod_labels(draft))
                assert not selector_matches(peer["podSelector"], pod_labels(verify))
            assert ports == {grpc_port}, "the draft rule opens the gRPC port only"
            admitting_drafters += 1
    assert admitting_drafters >= 1, "the drafters must be admitted to the gRPC port"


# ───────────────────────────── security ─────────────────────────────


def _dockerfile_uid(name: str) -> int:
    users = [line.split()[1] for line in (REPO / "docker" / name).read_text().splitlines()
             if line.strip().upper().startswith("USER ")]
    return int(users[-1].split(":")[0])


@overlay_param()
def test_every_container_is_locked_down(overlay):
    docs = render(overlay)
    image_uid = {_dockerfile_uid("draft.Dockerfile"), _dockerfile_uid("verify.Dockerfile")}
    for dep in objects(docs, "Deployment"):
        spec = dep["spec"]["template"]["spec"]
        pod = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False
        assert spec.get("hostNetwork", False) is False and spec.get("hostPID", False) is False
        for container in all_containers(dep):
            ctx = {**pod, **container.get("securityContext", {})}
            where = f"{overlay}: {dep['metadata']['name']}/{container['name']}"
            assert ctx.get("runAsNonRoot") is True, where
            assert isinstance(ctx.get("runAsUser"), int) and ctx["runAsUser"] != 0, where
            assert {ctx["runAsUser"]} == image_uid, f"{where}: runAsUser must be the images' USER"
            assert ctx.get("readOnlyRootFilesystem") is True, where
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert ctx.get("privileged", False) is False, where
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not ctx.get("capabilities", {}).get("add"), where
            assert ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            assert ":latest" not in container["image"] and ":" in container["image"].rsplit("/", 1)[-1], where


@overlay_param()
@pytest.mark.parametrize("component", ["verify", "draft"])
def test_writable_model_cache_and_tmp(overlay, component):
    dep, container, env = rendered_service(overlay, component)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    cache = mounts[env["DUO_CACHE_DIR"]]
    assert not cache.get("readOnly", False)
    assert set(volumes[cache["name"]]) & {"emptyDir", "persistentVolumeClaim"}
    assert env["HF_HOME"].startswith(env["DUO_CACHE_DIR"] + "/"), "hub downloads go to the cache volume"
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "read-only root FS: /tmp must be an emptyDir"
    assert env.get("HOME", "").startswith("/tmp")


# ───────────────────────────── TLS and token ─────────────────────────────


def _secret_file(dep, container, path: str) -> str:
    """The Secret that provides the file at path, through a read-only mount."""
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            assert mount.get("readOnly") is True, f"{mount['mountPath']} must be mounted read-only"
            volume = volumes[mount["name"]]
            assert "secret" in volume, f"{path} must come from a Secret"
            assert volume["secret"].get("defaultMode", 0o644) & 0o007 == 0, "no world access to keys"
            return volume["secret"]["secretName"]
    raise AssertionError(f"{path} is on no mount")


@pytest.mark.parametrize("overlay", TLS_OVERLAYS)
def test_tls_files_come_from_secrets_mounted_read_only(overlay):
    docs = render(overlay)
    verify_dep, draft_dep = deployment(docs, "verify"), deployment(docs, "draft")
    verify, draft = main_container(verify_dep), main_container(draft_dep)
    venv, denv = container_env(docs, verify), container_env(docs, draft)
    # Verifiers: server certificate + CA for client certificates (mutual TLS).
    for key in ("DUO_VERIFY_TLS_CERT", "DUO_VERIFY_TLS_KEY", "DUO_VERIFY_TLS_CA"):
        assert _secret_file(verify_dep, verify, venv[key]) == "duo-verify-tls"
    # Drafters: server certificate, and towards the verifiers a client certificate + the CA.
    for key in ("DUO_DRAFT_TLS_CERT", "DUO_DRAFT_TLS_KEY", "DUO_DRAFT_VERIFY_TLS_CA",
                "DUO_DRAFT_VERIFY_TLS_CERT", "DUO_DRAFT_VERIFY_TLS_KEY"):
        assert _secret_file(draft_dep, draft, denv[key]) == "duo-draft-tls"
    assert _secret_file(draft_dep, draft, denv["DUO_DRAFT_AUTH_TOKEN_FILE"]) == "duo-auth-token"


def test_dev_overlay_is_plaintext_without_secrets():
    docs = render("dev")
    for dep in objects(docs, "Deployment"):
        container = main_container(dep)
        env = container_env(docs, container)
        assert not any("TLS" in key or "AUTH_TOKEN" in key for key in env)
        assert not any("secret" in v for v in dep["spec"]["template"]["spec"]["volumes"])


def test_model_cache_pvc_component_swaps_the_emptydir_for_a_shared_claim(tmp_path):
    _kubectl()
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = Path(os.path.relpath(K8S / "base", overlay))
    component = Path(os.path.relpath(K8S / "components" / "model-cache-pvc", overlay))
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(base)], "components": [str(component)],
    }))
    docs = list(_render_dir(str(overlay)))
    (pvc,) = objects(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    for component_name in SERVICES:
        volumes = {v["name"]: v for v in deployment(docs, component_name)["spec"]["template"]["spec"]["volumes"]}
        assert volumes["model-cache"] == {"name": "model-cache",
                                          "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}}


def test_command_overrides_use_console_scripts_from_pyproject():
    """A container command (cpu-verifier: duo-verify serve) names a script pyproject.toml installs."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for overlay in OVERLAYS:
        for dep in objects(render(overlay), "Deployment"):
            command = main_container(dep).get("command")
            if command:
                assert command[0] in scripts and command[1] == "serve"
