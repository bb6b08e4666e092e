"""The Helm chart, checked with real tools and no cluster.

* Helm itself (the Helm 4 Go library bundled by the PyPI package ``helm-python-sdk``): ``lint`` and
  ``Chart.render`` (= ``helm template``, which enforces ``values.schema.json``).
* ``kubernetes-validate`` in strict mode (unknown fields rejected) against Kubernetes 1.29 and the
  newest version it ships schemas for. The prometheus-operator objects (ServiceMonitor,
  PrometheusRule) are custom resources it has no schema for: their structure is checked here against
  the fields of the monitoring.coreos.com/v1 CRDs the chart uses, their rules by ``promtool``.
* ``stream_learner.core.config``: the rendered ConfigMap must load into ``Settings``, and every field of
  ``Settings`` must be in values.yaml, so chart and code cannot drift apart.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate.utils as kv
import pydantic
import pytest
import yaml
from annotated_types import Ge, Gt, Le, Lt

from stream_learner.core.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "stream-learner"
RELEASE, NAMESPACE = "sentiment", "ml"
FULLNAME = f"{RELEASE}-stream-learner"
CONFIG_PATH = "/etc/stream-learner/config.yaml"
# 1.29 is the oldest version the chart supports (Chart.yaml kubeVersion); the newest is whatever
# kubernetes-validate knows, so a release of it with new schemas tightens this test by itself.
KUBE_VERSIONS = ["1.29", kv.major_minor(kv.latest_version())]
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

# Everything optional switched on: GPU, monitoring objects, every Secret reference, mutual TLS, the
# inference server (on CPU nodes, beside a learner on a GPU node).
FULL_VALUES: dict[str, Any] = {
    "image": {"repository": "registry.example.com/ml/stream-learner", "tag": "0.1.0-cuda"},
    "imagePullSecrets": [{"name": "registry-credentials"}],
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/learner"}},
    "podAnnotations": {"team": "ml"},
    "podLabels": {"cost-center": "ml"},
    "priorityClassName": "ml-training",
    "gpu": {"count": 1},
    "resources": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "24Gi"}},
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}
                        ]
                    }
                ]
            }
        }
    },
    "hfHubOffline": False,
    "persistence": {"enabled": True, "storageClass": "fast-ssd", "size": "50Gi"},
    "s3Credentials": {"existingSecret": "learner-s3"},
    "kafkaSasl": {"existingSecret": "learner-kafka-sasl"},
    "kafkaTls": {
        "existingSecret": "learner-kafka-tls",
        "certKey": "tls.crt",
        "keyKey": "tls.key",
        "keyPasswordKey": "key-password",
    },
    "extraEnv": [{"name": "LOG_FORMAT", "value": "json"}],
    "extraVolumes": [{"name": "extra", "emptyDir": {}}],
    "extraVolumeMounts": [{"name": "extra", "mountPath": "/extra"}],
    "serviceMonitor": {
        "enabled": True,
        "namespace": "monitoring",
        "labels": {"release": "kube-prometheus-stack"},
    },
    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "ML"}},
    "serving": {
        "enabled": True,
        "replicas": 3,
        "resources": {"requests": {"cpu": "2", "memory": "3Gi"}, "limits": {"memory": "6Gi"}},
        "nodeSelector": {"node-role/inference": "true"},
        "service": {"annotations": {"example.com/expose": "internal"}},
    },
    "config": {
        "kafka": {
            "bootstrap_servers": "kafka-0.kafka:9093,kafka-1.kafka:9093",
            "topic": "reviews.labeled",
            "dlq_topic": "reviews.labeled.dead",
            "topic_partitions": 6,
            "client_config": {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"},
        },
        "model": {"labels": ["neg", "neu", "pos"], "num_hidden_layers": 4},
        "training": {"device": "cuda", "learning_rate": 2.0e-5},
        # a large integer: Helm must not turn it into 2e+06, which Settings would refuse
        "replay": {"capacity": 2_000_000, "class_balanced": True},
        "publish": {
            "storage_url": "s3://models/sentiment",
            "s3_endpoint_url": "http://minio.minio:9000",
            "s3_region": "eu-west-1",
            "stop_timeout_s": 600.5,
        },
        "serving": {"port": 8081, "model_name": "sentiment", "max_batch": 64},
    },
}
# The data-parallel mode: a StatefulSet of ranks and their headless Service, on an object store.
DISTRIBUTED_VALUES: dict[str, Any] = {
    "mode": "distributed",
    "distributed": {"ranks": 4, "port": 29400},
    "s3Credentials": {"existingSecret": "learner-s3"},
    "config": {
        "kafka": {"topic_partitions": 8},
        "publish": {"storage_url": "s3://models/sentiment", "s3_endpoint_url": "http://minio.minio:9000"},
        "distributed": {"timeout_s": 120.0},
    },
}
VALUE_SETS = {"default": {}, "full": FULL_VALUES, "distributed": DISTRIBUTED_VALUES}


# ----------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> dict[str, str]:
    """``helm template RELEASE CHART -n NAMESPACE`` with these values: template path → rendered text."""
    return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for path, text in rendered.items():
        if path.endswith(".txt"):  # NOTES.txt is shown to the user, not applied
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def only(docs: list[dict[str, Any]], kind: str, name: str = FULLNAME) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind}/{name} rendered"
    return found[0]


SERVING = f"{FULLNAME}-serving"


def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The learner's Deployment, or its StatefulSet in the distributed mode."""
    [found] = [
        d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == FULLNAME
    ]
    return found


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (learner,) = workload(docs)["spec"]["template"]["spec"]["containers"]
    return learner


def serving_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The inference server's container (``serving.enabled``)."""
    (server,) = only(docs, "Deployment", SERVING)["spec"]["template"]["spec"]["containers"]
    return server


def rendered_settings_file(docs: list[dict[str, Any]]) -> str:
    return only(docs, "ConfigMap")["data"]["config.yaml"]


def chart_values() -> dict[str, Any]:
    # PyYAML, not Helm: Helm drops null values, and a null setting must still be listed here
    return yaml.safe_load((CHART / "values.yaml").read_text())


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def settings_fields(model: type[pydantic.BaseModel] = Settings, prefix: str = "") -> dict[str, Any]:
    """Every leaf setting, dotted (``kafka.topic``) → its pydantic FieldInfo; nested models are walked."""
    leaves: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
            leaves |= settings_fields(annotation, f"{prefix}{name}.")
        else:
            leaves[f"{prefix}{name}"] = field
    return leaves


def leaf_paths(tree: dict[str, Any], stop_at: set[str], prefix: str = "") -> set[str]:
    """Dotted paths of a values tree; a path in ``stop_at`` (a dict-valued setting) is a leaf."""
    paths = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in stop_at:
            paths |= leaf_paths(value, stop_at, f"{path}.")
        else:
            paths.add(path)
    return paths


def nested(path: str, value: Any) -> dict[str, Any]:
    """``nested("a.b", 1)`` → ``{"a": {"b": 1}}``."""
    head, _, rest = path.partition(".")
    return {head: nested(rest, value) if rest else value}


def lookup(tree: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        tree = tree[key]
    return tree


def dict_settings() -> set[str]:
    """Settings whose value is a mapping (kafka.client_config): leaves, though dicts in YAML."""
    return {p for p, f in settings_fields().items() if typing.get_origin(f.annotation) is dict}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No STREAM_LEARNER_* variables of the developer's shell may leak into a Settings under test."""
    for name in list(os.environ):
        if name.upper().startswith("STREAM_LEARNER_"):
            monkeypatch.delenv(name)
    return monkeypatch


# --------------------------------------------------------------------------------- lint and render
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_lint_is_clean(value_set: str, kube_version: str) -> None:
    report = helm.lint(
        CHART, VALUE_SETS[value_set], strict=True, namespace=NAMESPACE, kube_version=f"v{kube_version}.0"
    )
    assert report["errors"] == []
    # severity 2 = warning, 3 = error; 1 (info) is only "icon is recommended"
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_oldest_validated_kubernetes_is_the_charts_declared_minimum(chart: helm.Chart) -> None:
    assert chart.metadata["kubeVersion"] == f">={KUBE_VERSIONS[0]}.0-0"


def test_default_render_has_the_core_objects_only(chart: helm.Chart) -> None:
    kinds = sorted(d["kind"] for d in manifests(render(chart, {})))
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"]


def test_full_render_has_every_optional_object(chart: helm.Chart) -> None:
    docs = manifests(render(chart, FULL_VALUES))
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == sorted(
        [
            ("ConfigMap", FULLNAME),
            ("ConfigMap", f"{FULLNAME}-dashboard"),
            ("Deployment", FULLNAME),
            ("PersistentVolumeClaim", FULLNAME),
            ("PodDisruptionBudget", FULLNAME),
            ("PrometheusRule", FULLNAME),
            ("Service", FULLNAME),
            ("ServiceAccount", FULLNAME),
            ("ServiceMonitor", FULLNAME),
            ("Deployment", SERVING),
            ("Service", SERVING),
            ("PodDisruptionBudget", SERVING),
            ("ServiceMonitor", SERVING),
        ]
    )


def test_packaged_chart_renders_the_same(chart: helm.Chart, tmp_path: Path) -> None:
    # what a chart repository serves is the .tgz: files/ and the schema must be inside it
    archive = helm.package(CHART, destination=tmp_path)
    with helm.Chart.load(archive) as packaged:
        assert packaged.schema == json.loads((CHART / "values.schema.json").read_text())
        assert render(packaged, FULL_VALUES) == render(chart, FULL_VALUES)
        with pytest.raises(helm.HelmValuesError):
            render(packaged, {"replicas": 2})


# ------------------------------------------------------------------------------ kubernetes-validate
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_manifest_passes_kubernetes_validate_strict(
    chart: helm.Chart, value_set: str, kube_version: str
) -> None:
    docs = manifests(render(chart, VALUE_SETS[value_set]))
    validated = 0
    for doc in docs:
        what = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in CRD_KINDS:
            # no schema for custom resources: proven here, checked structurally below instead
            with pytest.raises(kv.SchemaNotFoundError):
                kv.validate(doc, kube_version, strict=True)
            continue
        try:
            schema_version = kv.validate(doc, kube_version, strict=True)
        except kv.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            pytest.fail(f"{what} is invalid for Kubernetes {kube_version} at {path}: {err.message}")
        assert schema_version == kube_version  # validated against that version's own schemas
        validated += 1
    assert validated == len([d for d in docs if d["kind"] not in CRD_KINDS]) >= 5


def test_kubernetes_validate_catches_an_unknown_field(chart: helm.Chart) -> None:
    # the validator itself is strict, so a passing manifest means something
    deployment = only(manifests(render(chart, {})), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFS"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, KUBE_VERSIONS[0], strict=True)


# ---------------------------------------------------------------- prometheus-operator custom resources
# The parts of the monitoring.coreos.com/v1 CRDs (prometheus-operator) the chart renders, with their
# field names and Duration pattern; unknown fields are refused as the API server's structural schema would.
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_CR_ENVELOPE = {
    "apiVersion": {"const": "monitoring.coreos.com/v1"},
    "metadata": {"type": "object"},  # checked as ObjectMeta by kubernetes-validate below
}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        **_CR_ENVELOPE,
        "kind": {"const": "ServiceMonitor"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": _STRING_MAP, "matchExpressions": {"type": "array"}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        **_CR_ENVELOPE,
        "kind": {"const": "PrometheusRule"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "limit": {"type": "integer"},
                            "partial_response_strategy": {"type": "string"},
                            "query_offset": _DURATION,
                            "labels": _STRING_MAP,
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["expr"],
                                    # an alerting rule or a recording rule, never both
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "properties": {
                                        "alert": {"type": "string", "minLength": 1},
                                        "record": {"type": "string", "minLength": 1},
                                        "expr": {"type": ["string", "integer"], "minLength": 1},
                                        "for": _DURATION,
                                        "keep_firing_for": _DURATION,
                                        "labels": _STRING_MAP,
                                        "annotations": _STRING_MAP,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def _check_custom_resource(doc: dict[str, Any], schema: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(schema).validate(doc)
    # its metadata is a plain ObjectMeta: let kubernetes-validate check it inside an object it knows
    for version in KUBE_VERSIONS:
        kv.validate(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}, version, strict=True
        )


@pytest.mark.parametrize(("name", "job"), [(FULLNAME, "stream-learner"), (SERVING, "stream-learner-serving")])
def test_service_monitor_scrapes_the_metrics_service(chart: helm.Chart, name: str, job: str) -> None:
    """The learner's ServiceMonitor, and the inference server's: each finds its own Service."""
    docs = manifests(render(chart, FULL_VALUES))
    monitor, service = only(docs, "ServiceMonitor", name), only(docs, "Service", name)
    _check_custom_resource(monitor, SERVICE_MONITOR_SCHEMA)
    spec = monitor["spec"]
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # what Prometheus selects by
    # it finds the Service: in its namespace, by its labels, on a port the Service has
    assert spec["namespaceSelector"]["matchNames"] == [NAMESPACE]
    assert service["metadata"]["namespace"] == NAMESPACE
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # job="stream-learner" (-serving) whatever the release is called: the label it names is on the
    # Service (files/alerts.yaml and the dashboard match these jobs: test_alerts_select_their_own_jobs)
    assert service["metadata"]["labels"][spec["jobLabel"]] == job
    # …and no other ServiceMonitor selects this Service: a target is scraped once, as one job
    others = [d for d in docs if d["kind"] == "ServiceMonitor" and d["metadata"]["name"] != name]
    assert others
    for other in others:
        assert not other["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    # …and the alerts of its group in files/alerts.yaml that name a job select it, the others do not
    groups = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())["groups"]
    named = 0
    for group in groups:
        for rule in group["rules"]:
            selects = _selects_job(rule["expr"], job)
            if selects is not None:
                assert selects == (group["name"] == job), f"{rule['alert']}: {rule['expr']}"
                named += 1
    assert named >= 3


def _selects_job(expr: str, job: str) -> bool | None:
    """Whether the ``job`` label matchers of ``expr`` all accept ``job`` (Prometheus anchors its
    regexes); None when ``expr`` has none."""
    matchers = re.findall(r'\bjob\s*(=~|!~|!=|=)\s*"([^"]*)"', expr)
    if not matchers:
        return None
    accepts = {
        "=": lambda m: job == m,
        "!=": lambda m: job != m,
        "=~": lambda m: re.fullmatch(m, job) is not None,
        "!~": lambda m: re.fullmatch(m, job) is None,
    }
    return all(accepts[op](matcher) for op, matcher in matchers)


def test_job_matching_reads_every_operator() -> None:
    expr = 'up{job=~".*stream-learner.*", job!~".*-serving"} == 0 and x{job!="a"}'
    assert _selects_job(expr, "prod-stream-learner") is True
    assert _selects_job(expr, "stream-learner-serving") is False
    assert _selects_job('up{job="a"}', "a") is True and _selects_job("up == 0", "a") is None


def test_prometheus_rule_carries_files_alerts_yaml_unchanged(chart: helm.Chart) -> None:
    rule = only(manifests(render(chart, FULL_VALUES)), "PrometheusRule")
    _check_custom_resource(rule, PROMETHEUS_RULE_SCHEMA)
    source = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    # .Files.Get | fromYaml | toYaml must not re-template ({{ $labels.x }}) nor retype anything
    assert rule["spec"]["groups"] == source["groups"]
    names = [g["name"] for g in rule["spec"]["groups"]]
    assert len(names) == len(set(names))
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert alerts and all(str(r["expr"]).strip() for r in alerts)


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed"
)
def test_prometheus_rule_groups_pass_promtool(chart: helm.Chart, tmp_path: Path) -> None:
    rule = only(manifests(render(chart, FULL_VALUES)), "PrometheusRule")
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    result = subprocess.run(
        ["promtool", "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_dashboard_config_map_is_files_dashboard_json(chart: helm.Chart) -> None:
    dashboard = only(manifests(render(chart, FULL_VALUES)), "ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"  # the sidecar's default label
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "ML"}
    (data,) = dashboard["data"].values()
    assert json.loads(data) == json.loads((CHART / "files" / "dashboard.json").read_text())


# --------------------------------------------------------------------------------- values.schema.json
@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ({"replicas": 2}, "/replicas"),
        ({"mode": "parallel"}, "/mode"),
        ({"mode": "distributed", "distributed": {"ranks": 1}}, "/distributed/ranks"),  # a group has ≥ 2
        ({"resources": {"limits": {"cpu": "-1"}}}, "/resources/limits/cpu"),
        ({"resources": {"requests": {"memory": -5}}}, "/resources/requests/memory"),
        ({"gpu": {"count": -1}}, "/gpu/count"),
        ({"gpu": {"count": "one"}}, "/gpu/count"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"image": {"allowNonCudaTagWithGpu": "yes"}}, "/image/allowNonCudaTagWithGpu"),
        ({"serviceMonitor": {"interval": "30 seconds"}}, "/serviceMonitor/interval"),
        ({"podDisruptionBudget": {"maxUnavailable": 2}}, "/podDisruptionBudget/maxUnavailable"),
        ({"serving": {"enabled": "yes"}}, "/serving/enabled"),
        ({"serving": {"replicas": -1}}, "/serving/replicas"),
        ({"serving": {"rollingUpdate": {"maxSurge": "ten"}}}, "/serving/rollingUpdate/maxSurge"),
        ({"serving": {"resources": {"requests": {"memory": "2 GB"}}}}, "/serving/resources/requests/memory"),
        (
            {"serving": {"probes": {"readiness": {"periodSeconds": 0}}}},
            "/serving/probes/readiness/periodSeconds",
        ),
        ({"serving": {"service": {"port": 0}}}, "/serving/service/port"),
        ({"serving": {"gpu": {"resourceName": "x"}}}, "resourceName"),  # gpu.resourceName is shared
        ({"serving": {"replicaCount": 2}}, "replicaCount"),
        ({"config": {"serving": {"port": 0}}}, "/config/serving/port"),  # the probes need a fixed port
        ({"replicaCount": 1}, "replicaCount"),  # unknown top-level value: a typo must not pass silently
        ({"config": {"kafka": {"topik": "x"}}}, "topik"),  # unknown setting
        ({"config": {"publish": {"stop_timeout_s": "2m"}}}, "/config/publish/stop_timeout_s"),
        ({"config": {"publish": {"storage_url": "gs://bucket/x"}}}, "/config/publish/storage_url"),
        ({"config": {"http": {"enabled": False}}}, "/config/http/enabled"),  # probes need it
        ({"config": {"http": {"port": 0}}}, "/config/http/port"),  # the Service needs a fixed port
        # null would drop the setting from the ConfigMap (and the grace period is computed from it)
        ({"config": {"publish": {"stop_timeout_s": None}}}, "stop_timeout_s"),
        # credentials only from Secrets, never in the ConfigMap
        (
            {"config": {"publish": {"s3_secret_access_key": "hunter2"}}},
            "/config/publish/s3_secret_access_key",
        ),
        ({"config": {"kafka": {"client_config": {"sasl.password": "hunter2"}}}}, "sasl.password"),
    ],
)
def test_schema_rejects_a_bad_value_at_render(chart: helm.Chart, bad: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        render(chart, bad)
    assert where in str(err.value)


def test_distributed_mode_renders_one_rank_per_pod_with_a_rendezvous(chart: helm.Chart) -> None:
    docs = manifests(render(chart, DISTRIBUTED_VALUES))
    assert not [d for d in docs if d["kind"] == "Deployment"]
    sts = only(docs, "StatefulSet")["spec"]
    assert sts["replicas"] == 4 and sts["podManagementPolicy"] == "Parallel"
    headless = only(docs, "Service", f"{FULLNAME}-ranks")["spec"]
    assert sts["serviceName"] == f"{FULLNAME}-ranks" and headless["clusterIP"] == "None"
    assert headless["publishNotReadyAddresses"] and headless["ports"][0]["port"] == 29400
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["WORLD_SIZE"]["value"] == "4" and env["MASTER_PORT"]["value"] == "29400"
    assert (
        env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    )
    assert env["MASTER_ADDR"]["value"] == f"{FULLNAME}-0.{FULLNAME}-ranks.{NAMESPACE}.svc"
    assert {"name": "rendezvous", "containerPort": 29400, "protocol": "TCP"} in container(docs)["ports"]
    # the single mode has none of it
    single = manifests(render(chart, {}))
    assert "WORLD_SIZE" not in {e["name"] for e in container(single)["env"]}
    assert not [d for d in single if d["metadata"]["name"].endswith("-ranks")]


def test_distributed_mode_on_a_file_store_fails_with_the_fix() -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError) as err:
        render(chart, {"mode": "distributed"})
    assert "must be an object store all pods reach (s3://bucket/prefix)" in str(err.value)


def _violations(field: Any) -> list[Any]:
    """Values Settings refuses for this field: past each numeric bound, outside a Literal, wrong type."""
    bad: list[Any] = []
    for bound in field.metadata:
        if isinstance(bound, Ge):
            bad.append(bound.ge - (1 if isinstance(bound.ge, int) else 1e-9))
        elif isinstance(bound, Gt):
            bad.append(bound.gt)
        elif isinstance(bound, Le):
            bad.append(bound.le + 1)
        elif isinstance(bound, Lt):
            bad.append(bound.lt)
    annotation = field.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if typing.get_origin(annotation) is typing.Literal:
        bad.append("none-of-these")
    base = args[0]
    if base in (int, float):
        bad.append("not-a-number")
    elif base is bool:
        bad.append("maybe")
    elif base is str:
        bad.append(12)
    elif typing.get_origin(base) in (list, dict):
        bad.append("not-a-collection")
    return bad


_BOUNDED = [(path, value) for path, field in settings_fields().items() for value in _violations(field)]


@pytest.mark.parametrize(("path", "value"), _BOUNDED, ids=[f"{p}={v!r}" for p, v in _BOUNDED])
def test_schema_is_as_strict_as_settings(
    chart: helm.Chart, clean_env: pytest.MonkeyPatch, path: str, value: Any
) -> None:
    with pytest.raises(pydantic.ValidationError):  # the learner would refuse it at start-up…
        Settings(**nested(path, value))
    with pytest.raises(helm.HelmValuesError):  # …so helm must refuse it at install time
        chart.validate_schema(chart.merge_values({"config": nested(path, value)}))


def test_default_and_full_values_pass_the_schema(chart: helm.Chart) -> None:
    for values in VALUE_SETS.values():
        chart.validate_schema(chart.merge_values(values))


# -------------------------------------------------------------------------------- chart ↔ Settings
def test_every_setting_is_in_values_yaml_and_nothing_else() -> None:
    fields = settings_fields()
    in_values = leaf_paths(chart_values()["config"], stop_at=dict_settings())
    assert sorted(set(fields) - in_values) == [], "settings missing from values.yaml config:"
    assert sorted(in_values - set(fields)) == [], "values.yaml config has keys Settings does not know:"


def test_every_setting_is_in_the_schema() -> None:
    def walk(node: dict[str, Any], prefix: str) -> set[str]:
        if prefix.rstrip(".") in dict_settings() or "properties" not in node:
            return {prefix.rstrip(".")}
        # every object level refuses unknown keys, so a misspelt setting fails at install
        assert node["additionalProperties"] is False, prefix or "config"
        return set().union(*(walk(child, f"{prefix}{key}.") for key, child in node["properties"].items()))

    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]
    assert walk(schema, "") == set(settings_fields())


# Where the chart's default differs from the code's, and why.
CHART_DEFAULTS = {
    # the code's ./stream-learner-models is relative to a read-only working directory in the pod
    "publish.storage_url": "file:///var/lib/stream-learner/models",
}


def test_values_yaml_defaults_are_the_settings_defaults(clean_env: pytest.MonkeyPatch) -> None:
    code = Settings().model_dump()
    chart = chart_values()["config"]
    for path in settings_fields():
        expected = CHART_DEFAULTS.get(path, lookup(code, path))
        got = lookup(chart, path)
        if isinstance(expected, pydantic.SecretStr) or expected is None:
            assert got is None, path
        else:
            assert got == expected, f"{path}: values.yaml {got!r}, Settings {expected!r}"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_config_map_loads_into_settings(
    chart: helm.Chart, clean_env: pytest.MonkeyPatch, tmp_path: Path, value_set: str
) -> None:
    values = VALUE_SETS[value_set]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(rendered_settings_file(manifests(render(chart, values))))
    loaded = load_settings(config_file)  # ConfigError (a test failure) if the chart wrote a bad setting

    # …and it holds exactly the values asked for, nothing mangled (types, big integers, floats)
    expected = merge(chart_values()["config"], values.get("config", {}))
    if values.get("kafkaTls", {}).get("existingSecret"):
        mount = "/etc/stream-learner/kafka-tls"
        expected["kafka"]["client_config"] |= {
            "ssl.ca.location": f"{mount}/ca.crt",
            "ssl.certificate.location": f"{mount}/tls.crt",
            "ssl.key.location": f"{mount}/tls.key",
        }
    assert loaded.model_dump() == Settings(**expected).model_dump()


def test_kafka_tls_locations_written_by_the_user_win(chart: helm.Chart) -> None:
    values = merge(
        FULL_VALUES, {"config": {"kafka": {"client_config": {"ssl.ca.location": "/etc/ssl/certs/ca.pem"}}}}
    )
    client = yaml.safe_load(rendered_settings_file(manifests(render(chart, values))))["kafka"][
        "client_config"
    ]
    assert client["ssl.ca.location"] == "/etc/ssl/certs/ca.pem"
    assert client["ssl.key.location"] == "/etc/stream-learner/kafka-tls/tls.key"


def test_secrets_reach_settings_through_env_and_never_the_config_map(
    chart: helm.Chart, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    docs = manifests(render(chart, FULL_VALUES))
    config_text = rendered_settings_file(docs)
    # the env vars Kubernetes would set from the Secrets, each with a value naming its source
    from_secrets = {}
    for env in container(docs)["env"]:
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            # a name Kubernetes accepts (letters, digits, '_', '-', '.'; not starting with a digit)
            assert re.fullmatch(r"[-._a-zA-Z][-._a-zA-Z0-9]*", env["name"]), env["name"]
            from_secrets[env["name"]] = f"{ref['name']}/{ref['key']}"
            clean_env.setenv(env["name"], from_secrets[env["name"]])
    assert len(from_secrets) == 5
    for secret_value in from_secrets.values():
        assert secret_value not in config_text

    config_file = tmp_path / "config.yaml"
    config_file.write_text(config_text)
    settings = load_settings(config_file)
    publish, client = settings.publish, settings.kafka.client_config
    assert publish.s3_access_key_id is not None and publish.s3_secret_access_key is not None
    assert publish.s3_access_key_id.get_secret_value() == "learner-s3/access-key-id"
    assert publish.s3_secret_access_key.get_secret_value() == "learner-s3/secret-access-key"
    assert client["sasl.username"] == "learner-kafka-sasl/username"
    assert client["sasl.password"] == "learner-kafka-sasl/password"
    assert client["ssl.key.password"] == "learner-kafka-tls/key-password"
    # merged with, not replacing, the file's librdkafka settings
    assert client["security.protocol"] == "SASL_SSL" and client["sasl.mechanism"] == "SCRAM-SHA-512"
    assert client["ssl.ca.location"] == "/etc/stream-learner/kafka-tls/ca.crt"


# ------------------------------------------------------------------------------------ the Deployment
def test_deployment_runs_one_learner_with_recreate(chart: helm.Chart) -> None:
    docs = manifests(render(chart, {}))
    spec = workload(docs)["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    learner = container(docs)
    assert (
        "command" not in learner
    )  # the image's entrypoint, stream-learner (tests/project/test_dockerfile.py)
    assert learner["args"] == ["run", "--config", CONFIG_PATH]
    (mount,) = [m for m in learner["volumeMounts"] if m["mountPath"] == CONFIG_PATH]
    volume = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}[mount["name"]]
    assert volume["configMap"]["name"] == FULLNAME and mount["subPath"] == "config.yaml"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_probes_service_and_port_follow_http_settings(chart: helm.Chart, value_set: str) -> None:
    values = merge(VALUE_SETS[value_set], {"config": {"http": {"port": 9200}}})
    docs = manifests(render(chart, values))
    learner = container(docs)
    assert learner["ports"][0] == {"name": "http", "containerPort": 9200, "protocol": "TCP"}
    assert [p["name"] for p in learner["ports"]] == ["http"] + (
        ["rendezvous"] if value_set == "distributed" else []
    )
    assert learner["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert learner["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    service = only(docs, "Service")
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 9200, "targetPort": "http", "protocol": "TCP"}
    ]
    assert service["spec"]["publishNotReadyAddresses"] is True  # a degraded learner is still scraped
    pod_labels = workload(docs)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert only(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_security_context_and_writable_paths(chart: helm.Chart) -> None:
    docs = manifests(render(chart, {}))
    pod = workload(docs)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    learner = container(docs)
    ctx = learner["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["runAsUser"] == 10001
    # every path the learner writes is an emptyDir: /tmp and each cache variable
    empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    writable = [m["mountPath"] for m in learner["volumeMounts"] if m["name"] in empty]
    assert "/tmp" in writable
    env = {e["name"]: e.get("value") for e in learner["env"]}
    caches = ("HF_HOME", "XDG_CACHE_HOME", "TORCH_HOME", "MPLCONFIGDIR", "TMPDIR")
    # training.compile's (Triton's default, ~/.triton, is on the read-only root filesystem)
    caches += ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    for var in caches:
        assert any(env[var] == w or env[var].startswith(w + "/") for w in writable), var
    assert env["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize(
    ("stop_timeout_s", "margin", "grace"), [(120.0, 30, 150), (600.5, 30, 631), (10, 0, 10)]
)
def test_termination_grace_period_fits_the_final_publish(
    chart: helm.Chart, stop_timeout_s: float, margin: int, grace: int
) -> None:
    values = {
        "terminationGraceMarginSeconds": margin,
        "config": {"publish": {"stop_timeout_s": stop_timeout_s}},
    }
    pod = workload(manifests(render(chart, values)))["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == grace == math.ceil(stop_timeout_s) + margin


def test_config_checksum_restarts_the_pod_when_settings_change(chart: helm.Chart) -> None:
    def checksum_and_config(values: dict[str, Any]) -> tuple[str, str]:
        rendered = render(chart, values)
        pod = workload(manifests(rendered))["spec"]["template"]
        return pod["metadata"]["annotations"]["checksum/config"], rendered[
            "stream-learner/templates/configmap.yaml"
        ]

    before, config_map = checksum_and_config({})
    assert before == hashlib.sha256(config_map.encode()).hexdigest()
    after, _ = checksum_and_config({"config": {"training": {"l2sp_lambda": 0.1}}})
    assert after != before
    assert checksum_and_config({"podAnnotations": {"a": "b"}})[0] == before


def test_full_values_wire_gpu_secrets_tls_and_scheduling(chart: helm.Chart) -> None:
    docs = manifests(render(chart, FULL_VALUES))
    pod = workload(docs)["spec"]["template"]["spec"]
    learner = container(docs)
    assert learner["image"] == "registry.example.com/ml/stream-learner:0.1.0-cuda"
    assert learner["resources"]["limits"] == {"memory": "24Gi", "nvidia.com/gpu": "1"}
    assert pod["tolerations"] == FULL_VALUES["tolerations"]
    assert pod["nodeSelector"] == FULL_VALUES["nodeSelector"]
    assert pod["affinity"] == FULL_VALUES["affinity"]
    assert pod["priorityClassName"] == "ml-training"
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert pod["terminationGracePeriodSeconds"] == 631
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in learner["volumeMounts"]}
    assert volumes["kafka-tls"]["secret"] == {"secretName": "learner-kafka-tls", "defaultMode": 0o440}
    assert mounts["kafka-tls"] == {
        "name": "kafka-tls",
        "mountPath": "/etc/stream-learner/kafka-tls",
        "readOnly": True,
    }
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": FULLNAME}
    assert mounts["extra"]["mountPath"] == "/extra"
    env = {e["name"]: e for e in learner["env"]}
    assert env["LOG_FORMAT"]["value"] == "json" and env["HF_HUB_OFFLINE"]["value"] == "0"
    claim = only(docs, "PersistentVolumeClaim")
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert (
        claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    )  # versions outlive the release
    account = only(docs, "ServiceAccount")
    assert account["metadata"]["annotations"] == FULL_VALUES["serviceAccount"]["annotations"]


def test_no_gpu_no_gpu_limit_and_s3_store_needs_no_volume(chart: helm.Chart) -> None:
    docs = manifests(render(chart, {"config": {"publish": {"storage_url": "s3://models/x"}}}))
    learner = container(docs)
    assert not any("gpu" in k for k in learner["resources"]["limits"])
    assert "data" not in {m["name"] for m in learner["volumeMounts"]}
    assert not any(e["name"].startswith("STREAM_LEARNER_") for e in learner["env"])  # no secrets asked for


# ------------------------------------------------------------------------------ GPU: image and count
def _image_and_gpus(chart: helm.Chart, values: dict[str, Any]) -> tuple[str, str | None]:
    learner = container(manifests(render(chart, values)))
    return learner["image"], learner["resources"]["limits"].get("nvidia.com/gpu")


@pytest.mark.parametrize("mode", [{}, DISTRIBUTED_VALUES])
def test_a_gpu_gets_the_cuda_image_by_default(chart: helm.Chart, mode: dict[str, Any]) -> None:
    """The CPU image (the default tag, appVersion) on a GPU node trains on the CPU with `device: auto`
    while holding the GPU: with no tag given, a GPU pod runs "<appVersion>-cuda", as docs/deploy.md
    tags the CUDA image. The same in each rank of the distributed mode."""
    app_version = chart.metadata["appVersion"]
    image, gpus = _image_and_gpus(chart, merge(mode, {"gpu": {"count": 1}}))
    assert (image, gpus) == (f"stream-learner:{app_version}-cuda", "1")
    labels = workload(manifests(render(chart, {"gpu": {"count": 1}})))["metadata"]["labels"]
    assert labels["app.kubernetes.io/version"] == f"{app_version}-cuda"  # the label names what runs
    # an explicit CUDA tag is kept as given
    assert _image_and_gpus(chart, {"gpu": {"count": 1}, "image": {"tag": "0.2.0-cuda"}})[0].endswith(
        ":0.2.0-cuda"
    )


def test_no_gpu_keeps_the_cpu_image(chart: helm.Chart) -> None:
    """gpu.count 0 is the CPU image: the appVersion tag, or the tag given, and no GPU limit."""
    app_version = chart.metadata["appVersion"]
    assert _image_and_gpus(chart, {}) == (f"stream-learner:{app_version}", None)
    assert _image_and_gpus(chart, {"image": {"tag": "0.2.0"}}) == ("stream-learner:0.2.0", None)


def test_a_cpu_tag_with_a_gpu_fails_with_the_fix() -> None:
    """An explicit tag without "-cuda" and a GPU is most likely the CPU image: refused at render, with
    the tag to use; allowNonCudaTagWithGpu accepts it for a CUDA image tagged otherwise."""
    values = {"gpu": {"count": 1}, "image": {"tag": "0.2.0"}}
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError) as err:
        render(chart, values)
    message = str(err.value)
    assert 'image.tag "0.2.0" with gpu.count=1' in message
    assert 'Set image.tag to "0.2.0-cuda"' in message and "image.allowNonCudaTagWithGpu=true" in message
    with helm.Chart.load(CHART) as chart:
        allowed = merge(values, {"image": {"allowNonCudaTagWithGpu": True}})
        assert _image_and_gpus(chart, allowed) == ("stream-learner:0.2.0", "1")


@pytest.mark.parametrize("mode", [{}, DISTRIBUTED_VALUES])
def test_more_than_one_gpu_per_pod_fails_pointing_at_the_distributed_mode(mode: dict[str, Any]) -> None:
    """A learner process trains on one device (cuda:0 in a pod), so a second GPU in the pod would be
    held idle: refused, pointing at one rank (pod) per GPU."""
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError) as err:
        render(chart, merge(mode, {"gpu": {"count": 2}}))
    message = str(err.value)
    assert "gpu.count=2: the learner trains on one device per process" in message
    assert "Use gpu.count=1 per pod and scale out with mode=distributed and distributed.ranks=2" in message
    assert "docs/distributed.md" in message


def test_notes_warn_about_an_ephemeral_file_store(chart: helm.Chart) -> None:
    notes = render(chart, {})["stream-learner/templates/NOTES.txt"]
    assert "lost with the pod" in notes and "127.0.0.1:9092" in notes
    notes = render(chart, FULL_VALUES)["stream-learner/templates/NOTES.txt"]
    assert "WARNING" not in notes
    assert f"kubectl -n {NAMESPACE} rollout status deployment/{FULLNAME}" in notes
    # the inference server's Service and model name, when it is deployed
    assert f"port-forward service/{SERVING} 8080:8080" in notes
    assert f"http://{SERVING}.{NAMESPACE}.svc:8080/v2/models/sentiment/infer" in notes
    assert SERVING not in render(chart, {})["stream-learner/templates/NOTES.txt"]


# ------------------------------------------------------------------------------ the inference server
def test_server_runs_serve_on_the_learners_settings_and_credentials(chart: helm.Chart) -> None:
    """`stream-learner serve --config` the learner's settings file, with the learner's env (caches, S3
    credentials, extraEnv) but none of its Kafka Secrets, its own resources and scheduling."""
    from stream_learner.service.serving.server import GRACEFUL_S

    docs = manifests(render(chart, FULL_VALUES))
    deployment = only(docs, "Deployment", SERVING)
    spec, learner_spec = deployment["spec"], workload(docs)["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod, learner_pod = spec["template"]["spec"], learner_spec["template"]["spec"]
    server, learner = serving_container(docs), container(docs)
    assert "command" not in server and server["args"] == ["serve", "--config", CONFIG_PATH]
    assert server["image"] == learner["image"]
    # config.serving.port, named for the probes and the Service
    assert server["ports"] == [{"name": "http", "containerPort": 8081, "protocol": "TCP"}]
    assert server["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert (
        server["readinessProbe"]["periodSeconds"]
        == chart_values()["serving"]["probes"]["readiness"]["periodSeconds"]
    )
    # the same settings file, mounted alike, restarting both when it changes
    volumes = {v["name"]: v for v in pod["volumes"]}
    learner_volumes = {v["name"]: v for v in learner_pod["volumes"]}
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    learner_mounts = {m["name"]: m for m in learner["volumeMounts"]}
    for name in ("config", "tmp", "cache", "extra"):
        assert mounts[name] == learner_mounts[name] and volumes[name] == learner_volumes[name], name
    assert "kafka-tls" not in mounts and "kafka-tls" not in volumes
    checksum = "checksum/config"
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations[checksum] == learner_spec["template"]["metadata"]["annotations"][checksum]
    # the learner's env but Kafka's: caches, S3 credentials from the Secret, extraEnv
    env = {e["name"]: e for e in server["env"]}
    learner_env = {e["name"]: e for e in learner["env"]}
    kafka = {name for name in learner_env if name.startswith("STREAM_LEARNER_KAFKA__")}
    assert len(kafka) == 3
    assert env == {name: e for name, e in learner_env.items() if name not in kafka}
    assert (
        env["STREAM_LEARNER_PUBLISH__S3_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "learner-s3"
    )
    # the same identity and hardening
    assert server["securityContext"] == learner["securityContext"]
    assert pod["securityContext"] == learner_pod["securityContext"]
    for key in (
        "serviceAccountName",
        "automountServiceAccountToken",
        "imagePullSecrets",
        "priorityClassName",
    ):
        assert pod[key] == learner_pod[key], key
    # its own resources and nodes: no GPU beside a learner that has one
    assert server["resources"] == FULL_VALUES["serving"]["resources"]
    assert pod["nodeSelector"] == {"node-role/inference": "true"} and "tolerations" not in pod
    # a stop: the preStop sleep, the server's own graceful stop, the margin
    assert server["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert pod["terminationGracePeriodSeconds"] == 5 + GRACEFUL_S + 30


@pytest.mark.parametrize("value_set", ["full", "distributed"])
def test_learner_and_server_objects_select_only_their_own_pods(chart: helm.Chart, value_set: str) -> None:
    """The learner's selector labels (name, instance) cannot change after install: the servers' pods
    must not carry them, or the learner's Service, PodDisruptionBudget and workload would count them."""
    docs = manifests(render(chart, merge(VALUE_SETS[value_set], {"serving": {"enabled": True}})))
    learner_pods = workload(docs)["spec"]["template"]["metadata"]["labels"]
    server_pods = only(docs, "Deployment", SERVING)["spec"]["template"]["metadata"]["labels"]
    for doc in docs:
        selector = {
            "Deployment": lambda d: d["spec"]["selector"]["matchLabels"],
            "StatefulSet": lambda d: d["spec"]["selector"]["matchLabels"],
            "PodDisruptionBudget": lambda d: d["spec"]["selector"]["matchLabels"],
            "Service": lambda d: d["spec"]["selector"],
        }.get(doc["kind"])
        if selector is None:
            continue
        name = doc["metadata"]["name"]
        own, other = (server_pods, learner_pods) if name == SERVING else (learner_pods, server_pods)
        assert selector(doc).items() <= own.items(), f"{doc['kind']}/{name} misses its own pods"
        assert not selector(doc).items() <= other.items(), f"{doc['kind']}/{name} selects the other pods"


def test_server_service_and_disruption_budget(chart: helm.Chart) -> None:
    docs = manifests(render(chart, FULL_VALUES))
    service = only(docs, "Service", SERVING)
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    # requests reach ready replicas only (the learner's metrics Service publishes the others)
    assert "publishNotReadyAddresses" not in service["spec"]
    assert service["metadata"]["annotations"] == {"example.com/expose": "internal"}
    assert service["metadata"]["labels"]["app.kubernetes.io/component"] == "serving"
    budget = only(docs, "PodDisruptionBudget", SERVING)["spec"]
    assert budget["maxUnavailable"] == 1 and budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    # without the ServiceMonitors: no ServiceMonitor for the servers either
    off = manifests(render(chart, merge(FULL_VALUES, {"serviceMonitor": {"enabled": False}})))
    assert not [d for d in off if d["kind"] == "ServiceMonitor"]
    off = manifests(
        render(chart, merge(FULL_VALUES, {"serving": {"podDisruptionBudget": {"enabled": False}}}))
    )
    assert [d["metadata"]["name"] for d in off if d["kind"] == "PodDisruptionBudget"] == [FULLNAME]


@pytest.mark.parametrize(
    "persistence",
    [{}, {"enabled": True}, {"enabled": True, "existingClaim": "models", "accessModes": ["ReadWriteOnce"]}],
    ids=["emptyDir", "ReadWriteOnce", "existing-ReadWriteOnce"],
)
def test_server_on_a_file_store_of_one_pod_fails_with_the_fix(persistence: dict[str, Any]) -> None:
    """A file:// store is the learner pod's directory: other pods read it only from a ReadWriteMany claim."""
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError) as err:
        render(chart, {"serving": {"enabled": True}, "persistence": persistence})
    message = str(err.value)
    assert (
        "config.publish.storage_url file:///var/lib/stream-learner/models is a directory of the learner's pod"
        in message
    )
    assert "Use an object store all pods reach (config.publish.storage_url=s3://bucket/prefix)" in message
    assert "persistence.enabled=true with persistence.accessModes=[ReadWriteMany]" in message


@pytest.mark.parametrize(("existing", "claim"), [("", FULLNAME), ("shared-models", "shared-models")])
def test_server_on_a_read_write_many_claim_mounts_it_read_only(
    chart: helm.Chart, existing: str, claim: str
) -> None:
    values = {
        "serving": {"enabled": True},
        "persistence": {"enabled": True, "existingClaim": existing, "accessModes": ["ReadWriteMany"]},
    }
    docs = manifests(render(chart, values))
    for doc in docs:
        kv.validate(doc, KUBE_VERSIONS[0], strict=True)
    pod = only(docs, "Deployment", SERVING)["spec"]["template"]["spec"]
    learner_pod = workload(docs)["spec"]["template"]["spec"]
    (data,) = [v for v in pod["volumes"] if v["name"] == "data"]
    assert data["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}
    (learner_data,) = [v for v in learner_pod["volumes"] if v["name"] == "data"]
    assert learner_data["persistentVolumeClaim"] == {"claimName": claim}  # the learner writes
    (mount,) = [m for m in serving_container(docs)["volumeMounts"] if m["name"] == "data"]
    assert mount == {"name": "data", "mountPath": "/var/lib/stream-learner", "readOnly": True}
    assert not any(
        m["name"] == "data" for m in serving_container(manifests(render(chart, FULL_VALUES)))["volumeMounts"]
    )


def test_server_gpu_gets_the_cuda_image_and_one_gpu_at_most(chart: helm.Chart) -> None:
    """serving.gpu.count as the learner's gpu.count: the CUDA image when no tag is given, one per pod."""
    app_version = chart.metadata["appVersion"]
    values = {
        "serving": {"enabled": True, "gpu": {"count": 1}},
        "config": {"publish": {"storage_url": "s3://m/x"}},
    }
    docs = manifests(render(chart, values))
    server, learner = serving_container(docs), container(docs)
    assert server["image"] == f"stream-learner:{app_version}-cuda"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert (
        learner["image"] == f"stream-learner:{app_version}"
        and "nvidia.com/gpu" not in learner["resources"]["limits"]
    )
    for bad, expected in [
        (
            {"serving": {"gpu": {"count": 2}}},
            "serving.gpu.count=2: an inference server computes on one device",
        ),
        ({"image": {"tag": "0.2.0"}}, 'image.tag "0.2.0" with serving.gpu.count=1'),
    ]:
        with helm.Chart.load(CHART) as fresh, pytest.raises(helm.HelmRenderError) as err:
            render(fresh, merge(values, bad))
        assert expected in str(err.value)


# ---------------------------------------------------------------------------------- the chart README
def test_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.M))
    values = chart_values()
    # objects passed whole to Kubernetes are documented as one value
    whole = {"resources", "podSecurityContext", "securityContext", "probes.liveness", "probes.readiness"}
    whole |= {
        "grafanaDashboard.labels",
        "serving.resources",
        "serving.probes.liveness",
        "serving.probes.readiness",
    }
    wanted = leaf_paths({k: v for k, v in values.items() if k != "config"}, stop_at=whole)
    wanted |= {f"config.{section}" for section in values["config"]}
    assert sorted(wanted - documented) == [], "values missing from the chart README's table"
    assert sorted(documented - wanted) == [], "the chart README documents values that do not exist"


# ------------------------------------------------------------------------------- docs/deploy.md
DEPLOY_DOC = ROOT / "docs" / "deploy.md"


def _doc_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", DEPLOY_DOC.read_text(), flags=re.M | re.S)


def _doc_commands() -> list[str]:
    """Every shell command of the doc's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in _doc_blocks("bash"):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = re.sub(r"\s+#.*$", "", command).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def test_deploy_doc_values_install_and_load(
    chart: helm.Chart, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # the doc's values file, and its GPU addition on top: both must install, validate and load
    learner_values, gpu = (yaml.safe_load(b) for b in _doc_blocks("yaml")[:2])
    for values in (learner_values, merge(learner_values, gpu)):
        docs = manifests(render(chart, values))
        for doc in docs:
            if doc["kind"] not in CRD_KINDS:
                kv.validate(doc, KUBE_VERSIONS[0], strict=True)
        config_file = tmp_path / "config.yaml"
        config_file.write_text(rendered_settings_file(docs))
        assert load_settings(config_file).publish.storage_url == "s3://models/sentiment"
    assert (
        container(manifests(render(chart, merge(learner_values, gpu))))["resources"]["limits"][
            "nvidia.com/gpu"
        ]
        == "1"
    )


def test_deploy_doc_commands_match_the_chart_and_the_cli(chart: helm.Chart) -> None:
    from typer.testing import CliRunner

    from stream_learner.cli import app

    commands = _doc_commands()
    rendered = {(d["kind"].lower(), d["metadata"]["name"]) for d in manifests(render(chart, FULL_VALUES))}
    # and the objects KServe makes for the doc's InferenceService: "<name>-predictor"
    for isvc in _inference_services():
        rendered |= {(kind, f"{isvc['metadata']['name']}-predictor") for kind in ("deployment", "service")}
    learner_cli = 0
    for command in commands:
        words = command.split()
        if words[0] == "helm" and words[1] in ("install", "upgrade", "template"):
            assert words[2:4] == [RELEASE, "./helm/stream-learner"] and f"-n {NAMESPACE}" in command, command
        # every object the doc names is one the chart renders for that release
        for kind, name in re.findall(r"\b(deployment|service|configmap)[/ ]((?:sentiment)[-\w]*)", command):
            assert (kind, name) in rendered, f"{command}: no {kind}/{name}"
        if "stream-learner" in words and words[0] != "docker" and words[0] != "helm":
            args = words[words.index("stream-learner") + 1 :]
            if args and args[0] in ("produce", "versions", "run", "serve"):
                learner_cli += 1
                # unknown options fail Click's parsing; --help then stops before anything runs
                result = CliRunner().invoke(app, [*args, "--help"])
                assert result.exit_code == 0, f"{command}: {result.output}"
                for path in [a for a in args if a.startswith("/")]:
                    # paths in the pod: the mounted settings file, or a file the image copies from the repo
                    assert path == CONFIG_PATH or (ROOT / path.removeprefix("/app/")).is_file(), path
    assert learner_cli >= 4


def _doc_yaml_documents() -> list[dict[str, Any]]:
    return [d for block in _doc_blocks("yaml") for d in yaml.safe_load_all(block) if isinstance(d, dict)]


def _inference_services() -> list[dict[str, Any]]:
    """The doc's KServe InferenceServices."""
    return [d for d in _doc_yaml_documents() if d.get("kind") == "InferenceService"]


def test_deploy_doc_serving_values_render_the_server(
    chart: helm.Chart, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Step 10's addition to the values file deploys the inference server on the doc's settings."""
    learner_values = _doc_yaml_documents()[0]
    (addition,) = [d for d in _doc_yaml_documents() if "serving" in d and "kind" not in d]
    docs = manifests(render(chart, merge(learner_values, addition)))
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kv.validate(doc, KUBE_VERSIONS[0], strict=True)
    assert only(docs, "Deployment", SERVING)["spec"]["replicas"] == addition["serving"]["replicas"]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(rendered_settings_file(docs))
    settings = load_settings(config_file)
    assert (
        settings.serving.model_name == "sentiment" and settings.publish.storage_url == "s3://models/sentiment"
    )
    assert "/v2/models/sentiment/infer" in DEPLOY_DOC.read_text()


# KServe's InferenceService CRD, its openAPIV3Schema trimmed to the predictor (tests/data/kserve/README.md)
KSERVE_SCHEMA = ROOT / "tests" / "data" / "kserve" / "inferenceservice-v1beta1.schema.json"


def _strict(node: Any) -> Any:
    """A CRD's structural schema as a JSON Schema that refuses unknown fields, as the API server does
    with strict field validation (kubectl's default since 1.27): every object with ``properties``
    gets ``additionalProperties: false`` unless it keeps unknown fields on purpose."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _strict(value) for key, value in node.items()}
    keeps_unknown = node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in node and "additionalProperties" not in node and not keeps_unknown:
        out["additionalProperties"] = False
    return out


def test_deploy_doc_kserve_example_passes_the_crd_schema(clean_env: pytest.MonkeyPatch) -> None:
    """The doc's InferenceService: valid for KServe's CRD (strict), a custom predictor as KServe names
    one, speaking the V2 protocol on the server's port, with settings the server loads."""
    validator = jsonschema.Draft7Validator(_strict(json.loads(KSERVE_SCHEMA.read_text())))
    (isvc,) = _inference_services()
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(isvc)]
    assert errors == []
    # the schema is strict: a misspelt field, or a field in the wrong place, fails
    for path, key in ((("spec", "predictor", "containers", 0), "argz"), (("spec", "predictor"), "image")):
        bad = copy.deepcopy(isvc)
        target = bad
        for part in path:
            target = target[part]
        target[key] = "x"
        assert not validator.is_valid(bad), (path, key)
    # metadata is an ObjectMeta (the CRD leaves it to the API server)
    kv.validate(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": isvc["metadata"]}, KUBE_VERSIONS[0], strict=True
    )
    # KServe's conventions for a custom predictor (pkg/constants/constants.go, predictor_custom.go):
    # the container "kserve-container", env PROTOCOL v1 or v2, HTTP on 8080
    (server,) = isvc["spec"]["predictor"]["containers"]
    assert server["name"] == "kserve-container" and server["args"] == ["serve"]
    env = {e["name"]: e for e in server["env"]}
    assert env["PROTOCOL"]["value"] == "v2"
    port = Settings.model_fields["serving"].default.port
    assert port == 8080 and [p["containerPort"] for p in server["ports"]] == [port]
    assert server["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}
    assert server["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port}
    # every STREAM_LEARNER_ variable sets a setting, and they load: the Secret's as a value naming it
    for name, entry in env.items():
        if name.startswith("STREAM_LEARNER_"):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            clean_env.setenv(name, f"{ref['name']}/{ref['key']}" if ref else entry["value"])
    settings = load_settings()
    assert settings.publish.storage_url == "s3://models/sentiment"
    assert settings.publish.s3_secret_access_key is not None
    assert settings.publish.s3_secret_access_key.get_secret_value() == "learner-s3/secret-access-key"
    assert settings.serving.model_name == isvc["metadata"]["name"] == "sentiment"
    # texts cut where the learner cuts them: the doc's values file keeps the chart's max_length
    assert "max_length" not in _doc_yaml_documents()[0]["config"]["model"]
    assert settings.model.max_length == chart_values()["config"]["model"]["max_length"]
