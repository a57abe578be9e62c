"""Validate rendered Kubernetes manifests offline, without a cluster.

    python ci/check_manifests.py RENDERED.yaml [--kube-version 1.33.0] [--expect-kind KIND ...]

Core kinds are checked with ``kubernetes-validate`` against the bundled OpenAPI schemas of the
given Kubernetes version, in strict mode (unknown fields are errors). The custom resources the
chart can emit (KEDA ScaledObject and TriggerAuthentication, Prometheus Operator ServiceMonitor
and PrometheusRule) have no bundled schema, so they are checked here against the fields their
CRDs require, plus the invariants the chart promises (a Kafka trigger on the consumer group's
lag, ``maxReplicaCount`` set). Every resource must carry the standard ``app.kubernetes.io``
labels. A kind that is neither core nor one of those is an error, so nothing passes unchecked.

Exit status 0 when every document passes, 1 otherwise, with one line per problem.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import yaml

# The Kubernetes version the chart's CI renders for and validates against (helm's
# --kube-version and kubernetes-validate's -k); within the chart's kubeVersion range.
DEFAULT_KUBE_VERSION = "1.33.0"

REQUIRED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
)

# Prometheus Operator's Duration pattern (monitoring.coreos.com/v1 CRD).
_DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    r"(([0-9]+)ms)?)$"
)
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "minLength": 1}},
}

# The fields the CRDs mark required (KEDA 2.x keda.sh/v1alpha1, Prometheus Operator
# monitoring.coreos.com/v1), plus what the chart itself guarantees.
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers", "minReplicaCount", "maxReplicaCount"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string", "minLength": 1}},
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"const": "kafka"},
                            # The CRD types trigger metadata as a map of strings.
                            "metadata": {
                                "type": "object",
                                "required": ["bootstrapServers", "consumerGroup", "lagThreshold"],
                                "additionalProperties": {"type": "string"},
                            },
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string", "minLength": 1}},
                            },
                        },
                    },
                },
            },
        },
    },
}

TRIGGER_AUTHENTICATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["secretTargetRef"],
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["parameter", "name", "key"],
                        "additionalProperties": False,
                        "properties": {
                            "parameter": {"type": "string", "minLength": 1},
                            "name": {"type": "string", "minLength": 1},
                            "key": {"type": "string", "minLength": 1},
                        },
                    },
                }
            },
        },
    },
}

SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "properties": {"matchLabels": {"type": "object", "minProperties": 1}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "anyOf": [{"required": ["port"]}, {"required": ["targetPort"]}],
                        "properties": {
                            "port": {"type": "string", "minLength": 1},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                        },
                    },
                },
            },
        },
    },
}

PROMETHEUS_RULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "properties": {
                                        "alert": {"type": "string", "minLength": 1},
                                        "record": {"type": "string", "minLength": 1},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": {"type": "string", "pattern": _DURATION},
                                        "labels": {"type": "object"},
                                        "annotations": {"type": "object"},
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


def _check_scaled_object(doc: dict[str, Any]) -> list[str]:
    spec = doc["spec"]
    if spec["maxReplicaCount"] < spec["minReplicaCount"]:
        return [f"maxReplicaCount {spec['maxReplicaCount']} < minReplicaCount"]
    return []


def _no_extra_check(doc: dict[str, Any]) -> list[str]:
    del doc
    return []


SemanticCheck = Callable[[dict[str, Any]], list[str]]

# (apiVersion, kind) -> (schema, further semantic check).
CUSTOM_KINDS: dict[tuple[str, str], tuple[dict[str, Any], SemanticCheck]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): (SCALED_OBJECT_SCHEMA, _check_scaled_object),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): (
        TRIGGER_AUTHENTICATION_SCHEMA,
        _no_extra_check,
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): (SERVICE_MONITOR_SCHEMA, _no_extra_check),
    ("monitoring.coreos.com/v1", "PrometheusRule"): (PROMETHEUS_RULE_SCHEMA, _no_extra_check),
}


def load_documents(text: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a multi-document stream (``helm template`` output)."""
    docs = [doc for doc in yaml.safe_load_all(text) if doc]
    for doc in docs:
        if not isinstance(doc, dict):
            raise ValueError(f"a manifest is not a mapping: {doc!r:.80}")
    return docs


def describe(doc: dict[str, Any]) -> str:
    """``Kind/name`` for messages."""
    name = doc.get("metadata", {}).get("name", "?")
    return f"{doc.get('kind', '?')}/{name}"


def _label_problems(doc: dict[str, Any]) -> list[str]:
    labels = doc.get("metadata", {}).get("labels") or {}
    return [f"missing label {label}" for label in REQUIRED_LABELS if not labels.get(label)]


def _schema_problems(doc: dict[str, Any], kube_version: str) -> list[str]:
    custom = CUSTOM_KINDS.get((str(doc.get("apiVersion")), str(doc.get("kind"))))
    if custom is not None:
        schema, extra_check = custom
        errors = sorted(
            jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda err: list(err.path)
        )
        messages = [f"{'/'.join(map(str, err.path)) or '<root>'}: {err.message}" for err in errors]
        return messages or extra_check(doc)
    try:
        kubernetes_validate.validate(doc, kube_version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {doc.get('apiVersion')} {doc.get('kind')} and no custom check"]
    except kubernetes_validate.ValidationError as exc:
        return [str(exc).splitlines()[0]]
    return []


def check_documents(docs: Iterable[dict[str, Any]], kube_version: str) -> list[str]:
    """Every problem found, one line each, prefixed by ``Kind/name``; empty when all pass."""
    problems: list[str] = []
    for doc in docs:
        found = _schema_problems(doc, kube_version) + _label_problems(doc)
        problems.extend(f"{describe(doc)}: {problem}" for problem in found)
    return problems


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifests", type=Path, nargs="+", help="rendered YAML files")
    parser.add_argument("--kube-version", default=DEFAULT_KUBE_VERSION)
    parser.add_argument(
        "--expect-kind",
        action="append",
        default=[],
        metavar="KIND",
        help="fail unless at least one manifest of this kind is present (repeatable)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    status = 0
    for path in args.manifests:
        docs = load_documents(path.read_text(encoding="utf-8"))
        problems = check_documents(docs, args.kube_version)
        kinds = {str(doc.get("kind")) for doc in docs}
        problems += [f"no {kind} rendered" for kind in args.expect_kind if kind not in kinds]
        for problem in problems:
            print(f"{path}: {problem}")
        summary = ", ".join(sorted(describe(doc) for doc in docs))
        verdict = "FAILED" if problems else "ok"
        print(f"{path}: {verdict}: {len(docs)} manifests ({summary})")
        status |= 1 if problems else 0
    return status


if __name__ == "__main__":
    sys.exit(main())
