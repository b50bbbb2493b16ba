"""The Kubernetes manifests (``deploy/kubernetes``): both overlays rendered with
``kubectl kustomize``, every object validated against the Kubernetes schemas, the
operational rules checked, and the rendered pod run in Docker: the migration Job's
container, then the workload's, with their args, environment (ConfigMap values as
rendered, Secrets from the test) and security context, until every probe path answers."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from deploykit import http, wait_http
from dockerenv import ROOT, unavailable
from server_proc import free_port

pytestmark = pytest.mark.deploy
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
OVERLAYS = {"s3": "Deployment", "local": "StatefulSet"}
PROBES = {"startupProbe": "/health/startup", "livenessProbe": "/health/live",
          "readinessProbe": "/health/ready"}
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
S3_BUCKET = "se-tests"  # created by tests/conftest.py's s3_endpoint


def kustomize(path: Path) -> list[dict]:
    if not shutil.which("kubectl"):
        unavailable("kubectl is not installed", "install kubectl, which has kustomize")
    proc = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True,  # noqa: S603,S607
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize(KUSTOMIZE / "overlays" / name) for name in OVERLAYS}


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid(rendered, overlay):
    kinds = sorted(doc["kind"] for doc in rendered[overlay])
    assert kinds == sorted(["ServiceAccount", "ConfigMap", "Service", "Job", OVERLAYS[overlay],
                            *(["PodDisruptionBudget"] if overlay == "s3" else ["Service"])])
    for doc in rendered[overlay]:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_operational_rules(rendered, overlay):
    docs = rendered[overlay]
    workload = one(docs, OVERLAYS[overlay])
    pod = workload["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = one(docs, "Service", "storage-element")
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    assert container["args"] == ["serve"] and "command" not in container
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port_names == {"http": 8000}
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    for probe, path in PROBES.items():
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    env = env_of(container)
    assert env["DB_AUTO_MIGRATE"]["value"] == "off"
    shutdown = float(env["SHUTDOWN_TIMEOUT"]["value"])
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[:2] == ["python", "-c"] and "sleep(5)" in pre_stop[2]
    assert pod["spec"]["terminationGracePeriodSeconds"] > shutdown + 5
    secret_env = {"DATABASE_URL"} | ({"STORAGE_S3_ACCESS_KEY_ID", "STORAGE_S3_SECRET_ACCESS_KEY"}
                                     if overlay == "s3" else set())
    assert {name for name, e in env.items() if "secretKeyRef" in e.get("valueFrom", {})} == \
        secret_env
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == "storage-element-jwt"
    assert env["JWT_PUBLIC_KEY_PATH"]["value"] == "/keys/public_key.pem"
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert {"/data", "/tmp", "/keys"} <= mounts.keys()
    configmap = one(docs, "ConfigMap")["data"]
    assert configmap["STORAGE_TYPE"] == overlay
    if overlay == "s3":
        assert workload["spec"]["replicas"] >= 2
        pdb = one(docs, "PodDisruptionBudget")
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert pdb["spec"]["minAvailable"] == 1
    else:
        assert workload["spec"]["replicas"] == 1
        (claim,) = workload["spec"]["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == mounts["/data"]
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        headless = one(docs, "Service", workload["spec"]["serviceName"])
        assert headless["spec"]["clusterIP"] == "None"
    # the Job migrates the same prefix, with the same settings and database
    job = one(docs, "Job")
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    assert migrate["args"] == ["migrate"]
    assert migrate["envFrom"] == container["envFrom"]
    assert env_of(migrate)["DATABASE_URL"] == env["DATABASE_URL"]


def test_servicemonitor_component(rendered, tmp_path):
    """The optional component: a ServiceMonitor that selects the Service, on /metrics."""
    overlay = tmp_path / "with-monitor"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(KUSTOMIZE / "overlays" / "s3", overlay)],
        "components": [os.path.relpath(KUSTOMIZE / "components" / "servicemonitor", overlay)]}))
    docs = kustomize(overlay)
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service", "storage-element")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"


def docker_run_args(pod_spec: dict, container: dict, configmap: dict[str, str],
                    secrets_: dict[str, str], secret_dirs: dict[str, Path],
                    overrides: dict[str, str]) -> list[str]:
    """``docker run`` options doing what the kubelet would with this container."""
    args: list[str] = []
    pod_sc, sc = pod_spec.get("securityContext", {}), container.get("securityContext", {})
    args += ["--user", f"{pod_sc['runAsUser']}:{pod_sc['runAsGroup']}"]
    if sc.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    for cap in sc.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", cap]
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmap)  # the one ConfigMap, as rendered
        assert "configMapRef" in source
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            env[item["name"]] = secrets_[item["valueFrom"]["secretKeyRef"]["key"]]
    env.update(overrides)
    args += [a for key, value in env.items() for a in ("-e", f"{key}={value}")]
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    claims = {c["metadata"]["name"] for c in pod_spec.get("volumeClaimTemplates", [])}
    for mount in container.get("volumeMounts", []):
        volume, path = volumes.get(mount["name"], {}), mount["mountPath"]
        if "emptyDir" in volume:
            args += ["--tmpfs", f"{path}:uid={pod_sc['runAsUser']},gid={pod_sc['runAsGroup']}"]
        elif "secret" in volume:
            args += ["-v", f"{secret_dirs[volume['secret']['secretName']]}:{path}:ro"]
        else:
            assert mount["name"] in claims, mount
            args += ["--mount", f"type=volume,dst={path}"]
    if "command" in container:
        args += ["--entrypoint", container["command"][0]]
    return args


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_pod_runs(rendered, overlay, docker, se_image, container_pg, s3_endpoint,
                           keypair, tmp_path, containers):
    docs = rendered[overlay]
    configmap = one(docs, "ConfigMap")["data"]
    secrets_ = {"DATABASE_URL": container_pg,
                "STORAGE_S3_ACCESS_KEY_ID": s3_endpoint.access_key,
                "STORAGE_S3_SECRET_ACCESS_KEY": s3_endpoint.secret_key}
    jwt = tmp_path / "jwt"
    jwt.mkdir(mode=0o755)
    shutil.copyfile(keypair[1], jwt / "public_key.pem")
    (jwt / "public_key.pem").chmod(0o644)
    port = free_port()
    # what differs from a cluster: the containers share the host's network (one port
    # each) and the S3 store is the suite's; a fresh prefix keeps the runs apart
    overrides = {"SERVER_PORT": str(port), "DB_TABLE_PREFIX": "k" + secrets.token_hex(5)}
    if overlay == "s3":
        overrides |= {"STORAGE_S3_ENDPOINT_URL": s3_endpoint.endpoint_url,
                      "STORAGE_S3_BUCKET_NAME": S3_BUCKET,
                      "STORAGE_S3_APP_FOLDER": "k8s-" + secrets.token_hex(4)}
    secret_dirs = {"storage-element-jwt": jwt}

    job = one(docs, "Job")["spec"]["template"]["spec"]
    (migrate,) = job["containers"]
    run = docker.run("run", "--rm", "--network", "host",
                     *docker_run_args(job, migrate, configmap, secrets_, secret_dirs,
                                      overrides), se_image, *migrate["args"], check=False)
    assert run.returncode == 0, run.stderr.decode()[-2000:]

    workload = one(docs, OVERLAYS[overlay])["spec"]
    pod = {**workload["template"]["spec"],
           "volumeClaimTemplates": workload.get("volumeClaimTemplates", [])}
    (container,) = pod["containers"]
    name = f"se-k8s-{overlay}-{secrets.token_hex(3)}"
    containers.append(name)
    docker.run("run", "-d", "--name", name, "--network", "host",
               *docker_run_args(pod, container, configmap, secrets_, secret_dirs, overrides),
               se_image, *container["args"])
    base = f"http://127.0.0.1:{port}"
    running = lambda: docker.out("inspect", "--format", "{{.State.Running}}", name) == "true"  # noqa: E731
    wait_http(base + container["startupProbe"]["httpGet"]["path"], 60, name, running)
    for probe in PROBES:
        assert http("GET", base + container[probe]["httpGet"]["path"])[0] == 200, probe
    assert http("GET", base + "/metrics")[0] == 200
