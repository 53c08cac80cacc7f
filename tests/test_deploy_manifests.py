"""The container image's recipe and the Kubernetes manifests (deploy/Containerfile, deploy/k8s/):
each overlay rendered with kustomize (kubectl's), every resource validated against the
Kubernetes API schemas (kubernetes-validate, offline, strict: an unknown field is an error) or,
for External Secrets Operator's resources, against the schema of the fields we use; the
rendered files the checklist applies are current; and what the manifests say agrees with the
settings, the systemd units, deploy/env.example and the seed checklist."""

import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from django.conf import settings
from django.urls import resolve

from cutover.phases import FLAG_NAMES, ORDER, flags_of, phase_from_flags

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
ENVIRONMENTS = ("staging", "production")
CHECKLIST = ROOT / "deploy" / "checklist" / "ledger-deployment-checklist.md"
# The oldest Kubernetes minor version the manifests are written for.
KUBERNETES_VERSION = "1.30.0"
ENGINE_SWITCHES = ("ENABLE_TREASURY_SCHEDULER", "ENABLE_ONCHAIN_ENGINE")
SECRETS = ("DJANGO_SECRET_KEY", "DATABASE_URL", *settings.SECRET_SETTINGS)
WORKLOADS = {
    "stack-service": "web",
    "stack-service-worker": "worker",
    "stack-service-beat": "beat",
    "stack-service-migrate": "migrate",
}

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _NAME, "namespace": _NAME, "labels": {"type": "object"}},
    "additionalProperties": False,
}
# external-secrets.io/v1, the fields these manifests use, as External Secrets Operator's CRDs
# define them (unknown fields refused, as strict validation does for Kubernetes' own kinds).
EXTERNAL_SECRETS_SCHEMAS = {
    "ExternalSecret": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "external-secrets.io/v1"},
            "kind": {"const": "ExternalSecret"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["secretStoreRef", "target", "data"],
                "additionalProperties": False,
                "properties": {
                    "refreshInterval": {"type": "string", "pattern": r"^\d+(ns|us|ms|s|m|h)$"},
                    "secretStoreRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "kind": {"enum": ["SecretStore", "ClusterSecretStore"]},
                            "name": _NAME,
                        },
                    },
                    "target": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "name": _NAME,
                            "creationPolicy": {"enum": ["Owner", "Orphan", "Merge", "None"]},
                        },
                    },
                    "data": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["secretKey", "remoteRef"],
                            "additionalProperties": False,
                            "properties": {
                                "secretKey": {"type": "string", "pattern": r"^[-._a-zA-Z0-9]+$"},
                                "remoteRef": {
                                    "type": "object",
                                    "required": ["key"],
                                    "additionalProperties": False,
                                    "properties": {"key": {"type": "string", "minLength": 1}},
                                },
                            },
                        },
                    },
                },
            },
        },
        "additionalProperties": False,
    },
    "SecretStore": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "external-secrets.io/v1"},
            "kind": {"const": "SecretStore"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["provider"],
                "additionalProperties": False,
                "properties": {
                    "provider": {
                        "type": "object",
                        "required": ["aws"],
                        "additionalProperties": False,
                        "properties": {
                            "aws": {
                                "type": "object",
                                "required": ["service", "region", "auth"],
                                "additionalProperties": False,
                                "properties": {
                                    "service": {"enum": ["SecretsManager", "ParameterStore"]},
                                    "region": {"type": "string", "pattern": r"^[a-z]+-[a-z]+-\d$"},
                                    "auth": {
                                        "type": "object",
                                        "required": ["jwt"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "jwt": {
                                                "type": "object",
                                                "required": ["serviceAccountRef"],
                                                "additionalProperties": False,
                                                "properties": {
                                                    "serviceAccountRef": {
                                                        "type": "object",
                                                        "required": ["name"],
                                                        "additionalProperties": False,
                                                        "properties": {"name": _NAME},
                                                    }
                                                },
                                            }
                                        },
                                    },
                                },
                            }
                        },
                    }
                },
            },
        },
        "additionalProperties": False,
    },
}


def kustomize(directory: Path) -> str:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render deploy/k8s"
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def rendered(environment: str) -> list[dict]:
    return list(yaml.safe_load_all(kustomize(K8S / "overlays" / environment)))


def rendered_in_phase(environment: str, phase: str) -> list[dict]:
    """The overlay rendered with the flags of `phase` (its component in k8s/phases/) instead
    of the ones it seeds a new database with, as editing its `components:` would."""
    with tempfile.TemporaryDirectory() as directory:
        here = Path(directory)
        # kustomize takes only relative paths to other kustomizations.
        (here / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [os.path.relpath(K8S / "overlays" / environment, here)],
                    "components": [os.path.relpath(K8S / "phases" / phase, here)],
                }
            )
        )
        return list(yaml.safe_load_all(kustomize(here)))


def validation_errors(resource: dict) -> list[str]:
    """Why the API server would refuse `resource` (empty when it would not)."""
    kind = resource.get("kind")
    if kind in EXTERNAL_SECRETS_SCHEMAS:
        validator = jsonschema.Draft7Validator(EXTERNAL_SECRETS_SCHEMAS[kind])
        return [f"{error.json_path}: {error.message}" for error in validator.iter_errors(resource)]
    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.path))}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"no schema: {error}"]
    return []


def by_kind(resources: list[dict], kind: str) -> dict[str, dict]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def workloads(resources: list[dict]) -> dict[str, dict]:
    return {**by_kind(resources, "Deployment"), **by_kind(resources, "Job")}


def app_container(workload: dict) -> dict:
    (container,) = [c for c in workload["spec"]["template"]["spec"]["containers"]]
    assert container["name"] == "app"
    return container


def container_environment(resources: list[dict], container: dict) -> dict[str, str | None]:
    """The variables a container gets: its envFrom (the ConfigMap's values; the Secret's keys,
    valued None) overridden by its env, as Kubernetes does."""
    config_maps = by_kind(resources, "ConfigMap")
    secrets = {
        external["spec"]["target"]["name"]: external
        for external in by_kind(resources, "ExternalSecret").values()
    }
    environment = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            environment.update(config_maps[source["configMapRef"]["name"]]["data"])
        else:
            external = secrets[source["secretRef"]["name"]]
            environment.update({item["secretKey"]: None for item in external["spec"]["data"]})
    environment.update({item["name"]: item["value"] for item in container.get("env", [])})
    return environment


def env_example() -> dict[str, str]:
    values = {}
    for line in (ROOT / "deploy" / "env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


@pytest.fixture(scope="module", params=ENVIRONMENTS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, rendered(request.param)


def test_rendered_files_the_checklist_applies_are_current():
    """`kubectl apply -f k8s/<environment>/deployment.yaml` applies the overlay as it is now;
    k8s/deployment.yaml, which the checklist applies without naming one, is production."""
    for environment in ENVIRONMENTS:
        expected = (
            f"# Rendered by deploy/k8s/render from overlays/{environment}: "
            "edit the overlay, not this file.\n" + kustomize(K8S / "overlays" / environment)
        )
        assert (K8S / environment / "deployment.yaml").read_text() == expected, (
            f"deploy/k8s/{environment}/deployment.yaml is stale: run deploy/k8s/render"
        )
    assert (K8S / "deployment.yaml").resolve() == (K8S / "production" / "deployment.yaml")


def test_the_image_holds_every_package_the_project_installs():
    """What `pip install .` installs is what the build copies and the build context admits, so
    the build's `collectstatic` (which loads every installed app) finds each app."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {
        name.rstrip("*") for name in project["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    containerfile = (ROOT / "deploy" / "Containerfile").read_text()
    copied = dict(re.findall(r"^COPY (\w+) (\w+)$", containerfile, re.MULTILINE))
    assert copied == {package: package for package in packages}
    admitted = re.findall(r"^!(\w+)/$", (ROOT / ".dockerignore").read_text(), re.MULTILINE)
    assert set(admitted) == packages
    assert "python manage.py collectstatic --noinput" in containerfile


def test_every_rendered_resource_is_valid(overlay):
    environment, resources = overlay
    assert len(resources) >= 14
    errors = {
        f"{r['kind']}/{r['metadata']['name']}": validation_errors(r)
        for r in resources
        if validation_errors(r)
    }
    assert not errors, f"{environment}: {errors}"


@pytest.mark.parametrize(
    ("path", "value", "complaint"),
    [
        # A misspelt field, a wrong type and a missing required field, each in one resource.
        (("spec", "template", "spec", "containers", 0, "readinesProbe"), {}, "readinesProbe"),
        (("spec", "replicas"), "two", "two"),
        (("spec", "template", "spec", "containers", 0, "name"), None, "name"),
        (("spec", "data", 0, "remoteRef", "name"), "x", "name"),
    ],
)
def test_validation_refuses_a_broken_resource(path, value, complaint):
    resources = rendered("production")
    kind = "ExternalSecret" if path[1] == "data" else "Deployment"
    resource = next(r for r in resources if r["kind"] == kind)
    assert validation_errors(resource) == []
    target = resource
    for key in path[:-1]:
        target = target[key]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    errors = validation_errors(resource)
    assert errors and complaint in " ".join(errors)


def test_the_checklist_deployment_names_and_commands_exist(overlay):
    """Every `deployment/<name>` the checklist uses is a Deployment: stack-service is the web."""
    _, resources = overlay
    named = set(re.findall(r"deployment/([a-z0-9-]+)", CHECKLIST.read_text()))
    assert named == {"stack-service"}
    assert set(workloads(resources)) == set(WORKLOADS)
    for name, component in WORKLOADS.items():
        labels = workloads(resources)[name]["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == component


def test_processes_run_the_commands_of_the_systemd_units(overlay):
    _, resources = overlay
    units = {
        component: re.search(
            r"^ExecStart=/opt/ledger-cutover/\.venv/bin/(.*)$",
            (ROOT / "deploy" / "systemd" / f"ledger-cutover-{component}.service").read_text(),
            re.MULTILINE,
        )
        .group(1)
        .split()
        for component in ("web", "worker", "beat")
    }
    containerfile = (ROOT / "deploy" / "Containerfile").read_text()
    image_command = yaml.safe_load(re.search(r"^CMD (.*)$", containerfile, re.MULTILINE)[1])
    # In a container gunicorn keeps its worker heartbeats in memory (/dev/shm), not on disk.
    in_memory_heartbeats = ["--worker-tmp-dir", "/dev/shm"]  # noqa: S108
    assert image_command == units["web"] + in_memory_heartbeats
    for name, component in WORKLOADS.items():
        command = app_container(workloads(resources)[name])["command"]
        if component == "migrate":
            assert command == ["python", "manage.py", "migrate", "--noinput"]
        elif component == "web":
            assert command == units["web"] + in_memory_heartbeats
        else:
            assert command == units[component]


def test_web_probes_are_the_service_probes_and_reach_django(overlay):
    """Readiness asks /readyz (the database), liveness /healthz (the process only), with
    a Host header Django accepts: the kubelet would otherwise send the pod's address."""
    _, resources = overlay
    web = app_container(by_kind(resources, "Deployment")["stack-service"])
    config = container_environment(resources, web)
    allowed_hosts = config["DJANGO_ALLOWED_HOSTS"].split(",")
    probes = {
        "readinessProbe": ("/readyz", "readyz"),
        "livenessProbe": ("/healthz", "healthz"),
        "startupProbe": ("/healthz", "healthz"),
    }
    for probe, (path, view) in probes.items():
        http = web[probe]["httpGet"]
        assert http["path"] == path
        assert resolve(path).url_name == view
        assert http["port"] == "http"
        (host,) = [h["value"] for h in http["httpHeaders"] if h["name"] == "Host"]
        assert host in allowed_hosts
    assert {p["name"]: p["containerPort"] for p in web["ports"]} == {"http": 8000}
    service = by_kind(resources, "Service")["stack-service"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert "stack-service" in allowed_hosts  # the Service's name, as in-cluster callers use it


def test_selectors_find_their_pods(overlay):
    _, resources = overlay
    pod_labels = {
        name: workload["spec"]["template"]["metadata"]["labels"]
        for name, workload in workloads(resources).items()
    }

    def selected(selector: dict) -> set[str]:
        return {name for name, labels in pod_labels.items() if selector.items() <= labels.items()}

    for deployment in by_kind(resources, "Deployment").values():
        assert selected(deployment["spec"]["selector"]["matchLabels"]) == {
            deployment["metadata"]["name"]
        }
    assert selected(by_kind(resources, "Service")["stack-service"]["spec"]["selector"]) == {
        "stack-service"
    }
    budgets = by_kind(resources, "PodDisruptionBudget")
    assert {
        name: selected(budget["spec"]["selector"]["matchLabels"]).pop()
        for name, budget in budgets.items()
    } == {name: name for name in ("stack-service", "stack-service-worker", "stack-service-beat")}
    autoscaler = by_kind(resources, "HorizontalPodAutoscaler")["stack-service"]
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == "stack-service"
    # The autoscaler owns the web's replica count: an apply must not reset it.
    assert "replicas" not in by_kind(resources, "Deployment")["stack-service"]["spec"]


def test_pods_run_as_non_root_with_resources(overlay):
    _, resources = overlay
    containerfile = (ROOT / "deploy" / "Containerfile").read_text()
    (image_user,) = re.findall(r"^USER (\d+):(\d+)$", containerfile, re.MULTILINE)
    for name, workload in workloads(resources).items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert str(pod["securityContext"]["runAsUser"]) == image_user[0] != "0"
        assert pod["automountServiceAccountToken"] is False
        for container in pod.get("initContainers", []) + pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert set(container["resources"]) == {"requests", "limits"}, name


def test_new_pods_wait_for_the_migrate_job(overlay):
    _, resources = overlay
    for deployment in by_kind(resources, "Deployment").values():
        (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
        assert "manage.py migrate --check" in init["command"][-1]
        assert init["image"] == app_container(deployment)["image"]
    job = by_kind(resources, "Job")["stack-service-migrate"]
    assert (
        app_container(job)["image"]
        == app_container(by_kind(resources, "Deployment")["stack-service"])["image"]
    )


def test_every_variable_of_env_example_reaches_every_process(overlay):
    """deploy/env.example's variables: the non-secret ones from the ConfigMap (flags as the
    containers' own env), the secrets only from AWS Secrets Manager, never from the ConfigMap."""
    _, resources = overlay
    (config_map,) = by_kind(resources, "ConfigMap").values()
    for name, workload in workloads(resources).items():
        environment = container_environment(resources, app_container(workload))
        missing = set(env_example()) - set(environment)
        assert not missing, f"{name} lacks {missing}"
        for secret in SECRETS:
            assert environment[secret] is None, f"{secret} of {name} is not from the Secret"
    assert not set(SECRETS) & set(config_map["data"])
    assert not set(FLAG_NAMES + ENGINE_SWITCHES) & set(config_map["data"])


def variables_the_settings_read(prefix: str) -> set[str]:
    """The environment variables named `prefix...` that config/settings/ reads through
    config/env.py's readers (`env.str("NAME", ...)`, `env_url("NAME", ...)`,
    `env_secret("NAME", ...)`, ...), and the secrets it reads by SECRET_SETTINGS."""
    names = {name for name in settings.SECRET_SETTINGS if name.startswith(prefix)}
    for path in (ROOT / "config" / "settings").glob("*.py"):
        if path.name == "test.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            reader = node.func
            through_env = (isinstance(reader, ast.Name) and reader.id.startswith("env")) or (
                isinstance(reader, ast.Attribute)
                and isinstance(reader.value, ast.Name)
                and reader.value.id == "env"
            )
            name = node.args[0]
            if (
                through_env
                and isinstance(name, ast.Constant)
                and isinstance(name.value, str)
                and name.value.startswith(prefix)
            ):
                names.add(name.value)
    return names


def test_every_due_setting_the_treasury_reads_reaches_every_process(overlay):
    """Every DUE_* variable the settings read reaches every process, commented out in
    deploy/env.example or not (the recipients, the rails, the account, the webhook's key):
    a job is not sent without its recipient, and Due's webhooks are refused without the key.
    Secrets only from the Secret, the others (the webhook's public key too) from the
    ConfigMap."""
    _, resources = overlay
    due = variables_the_settings_read("DUE_")
    # What the derivation must find (DUE_API_KEY through env_secret, the others through
    # env.str, env_url and env_ed25519_public_key): it reads the settings, not a list kept here.
    assert {"DUE_API_KEY", "DUE_API_BASE_URL", "DUE_RECIPIENT_USD", "DUE_WEBHOOK_PUBLIC_KEY"} <= due
    from_the_secret = set(SECRETS) & due
    (config_map,) = by_kind(resources, "ConfigMap").values()
    for name, workload in workloads(resources).items():
        environment = container_environment(resources, app_container(workload))
        missing = due - set(environment)
        assert not missing, f"{name} lacks {sorted(missing)}"
        for variable in from_the_secret:
            assert environment[variable] is None, f"{variable} of {name} is not from the Secret"
    assert not from_the_secret & set(config_map["data"])
    assert due - from_the_secret <= set(config_map["data"])


def test_configuration_loads_in_production_settings(overlay):
    """The ConfigMap and flags pass every check the production settings make at start and
    Django's deployment checks (the secrets, which come from AWS, replaced by strong
    stand-ins)."""
    _, resources = overlay
    web = app_container(by_kind(resources, "Deployment")["stack-service"])
    environment = {
        name: value
        for name, value in container_environment(resources, web).items()
        if value is not None and name != "PROMETHEUS_MULTIPROC_DIR"
    }
    stand_ins = {name: f"Zq8-{name.lower()}-4Kx7-stand-in" for name in SECRETS}
    stand_ins["DJANGO_SECRET_KEY"] = "k7Qw9zR2xV5mN8pL3tY6-" * 3
    stand_ins["DATABASE_URL"] = "postgres://ledger@db.internal:5432/ledger"
    stand_ins["CIRCLE_WALLET_ID"] = "1000000001"
    system = {name: os.environ[name] for name in ("PATH", "HOME") if name in os.environ}
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env={**system, "PYTHONPATH": str(ROOT), **environment, **stand_ins},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert environment["DJANGO_SETTINGS_MODULE"] == "config.settings.production"


def test_secrets_come_from_aws_secrets_manager_under_the_checklist_names(overlay):
    """Each secret is read from stack-service/<its name in kebab case> (as config/env.py reads
    them with AWS_SECRETS_PREFIX=stack-service/), and every name the checklist stores is one."""
    _, resources = overlay
    (external,) = by_kind(resources, "ExternalSecret").values()
    remote = {item["secretKey"]: item["remoteRef"]["key"] for item in external["spec"]["data"]}
    assert set(SECRETS) <= set(remote)
    for name, key in remote.items():
        assert key == "stack-service/" + name.lower().replace("_", "-")
    in_checklist = set(
        re.findall(r"--(?:name|secret-id) (stack-service/[a-z-]+)", CHECKLIST.read_text())
    )
    assert in_checklist == {
        "stack-service/circle-api-key",
        "stack-service/circle-webhook-secret",
        "stack-service/due-api-key",
    }
    assert in_checklist <= set(remote.values())
    (store,) = by_kind(resources, "SecretStore").values()
    assert external["spec"]["secretStoreRef"] == {
        "kind": "SecretStore",
        "name": "aws-secrets-manager",
    }
    assert store["spec"]["provider"]["aws"]["service"] == "SecretsManager"
    account = store["spec"]["provider"]["aws"]["auth"]["jwt"]["serviceAccountRef"]["name"]
    role = by_kind(resources, "ServiceAccount")[account]["metadata"]["annotations"]
    assert role["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


@pytest.mark.parametrize("phase", ORDER)
def test_phase_components_set_the_flags_of_their_phase(phase):
    component = yaml.safe_load((K8S / "phases" / phase.value / "kustomization.yaml").read_text())
    (patch,) = component["patches"]
    container = yaml.safe_load(patch["patch"])["spec"]["template"]["spec"]["containers"][0]
    assert {item["name"]: item["value"] for item in container["env"]} == {
        name: str(value).lower() if isinstance(value, bool) else value
        for name, value in flags_of(phase).items()
    }


def test_every_process_has_the_flags_the_checklist_sets(overlay):
    """The flags are each app container's own env entries, the same in every workload and a
    combination the settings accept: `kubectl set env deployment/stack-service FLAG=...`, as
    the checklist's rollback runs it, changes a value the manifest holds (the next apply of the
    manifest sets it back)."""
    _, resources = overlay
    text = CHECKLIST.read_text()
    set_env = re.search(r"kubectl set env deployment/stack-service((?:\s*\\\n\s*\w+=\w+)+)", text)
    rollback = dict(re.findall(r"(\w+)=(\w+)", set_env[1]))
    configured = re.search(r"Feature flags configured\*\*\n\s*```bash\n(.*?)```", text, re.DOTALL)
    checklist_flags = set(re.findall(r"^\s*(\w+)=", configured[1], re.MULTILINE))
    flag_values = set()
    for name, workload in workloads(resources).items():
        own = {item["name"]: item["value"] for item in app_container(workload)["env"]}
        assert set(rollback) | checklist_flags <= set(own), name
        flags = {flag: own[flag] for flag in FLAG_NAMES + ENGINE_SWITCHES}
        flag_values.add(tuple(flags.items()))
        phase_from_flags(
            tuple(
                own[flag] if flag == "BALANCE_SOURCE" else own[flag] == "true"
                for flag in FLAG_NAMES
            )
        )
    assert len(flag_values) == 1, "the workloads disagree on the flags"
