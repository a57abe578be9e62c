#!/usr/bin/env bash
# Validate the deployment files without a cluster or a container engine:
#   1. helm (built once from the Go module proxy, cached in ~/.cache/tagstream/bin),
#   2. `helm lint --strict` with the default values, with ci/values-all-on.yaml, and with that
#      plus mutual TLS files from a Secret (kafka.tls),
#   3. `helm template` with the default values, with every optional resource on (KEDA), with
#      the HPA alternative, and with every optional resource plus mutual TLS; each rendering is
#      validated offline by ci/check_manifests.py
#      (kubernetes-validate for core kinds, required fields for ScaledObject,
#      TriggerAuthentication, ServiceMonitor and PrometheusRule),
#   4. docker-compose.yml with `docker compose config -q` where the compose plugin exists, else
#      Debian's docker-compose, for the default, gpu and monitoring profiles.
# `--tools-only` stops after step 1 (what `make test` needs for tests/unit/test_deploy.py).
# Environment: PYTHON (default .venv/bin/python), TAGSTREAM_CACHE (default ~/.cache/tagstream).
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_MODULE=helm.sh/helm/v3
HELM_VERSION=v3.22.0
# Matches ci/check_manifests.py's default: helm built without release ldflags would otherwise
# assume Kubernetes v1.20, below the chart's kubeVersion.
KUBE_VERSION=1.33.0
CHART=helm/tagstream
ALL_ON=ci/values-all-on.yaml
# kafka.tls on top of ALL_ON (SASL_SSL): CA, client certificate and an encrypted key.
TLS_ON=(--set kafka.tls.existingSecret=tagstream-kafka-tls --set kafka.tls.certificateKey=tls.crt
  --set kafka.tls.keyKey=tls.key --set kafka.tls.keyPasswordKey=key-password)
PYTHON=${PYTHON:-.venv/bin/python}
CACHE=${TAGSTREAM_CACHE:-$HOME/.cache/tagstream}
export GOBIN=$CACHE/bin
HELM=$GOBIN/helm

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

log() { echo "validate-deploy: $*"; }

installed_helm_version() {
  # `go version -m` reads the module version the binary was built from.
  [[ -x $HELM ]] || return 0
  go version -m "$HELM" 2>/dev/null | awk -v mod="$HELM_MODULE" '$1 == "mod" && $2 == mod {print $3}'
}

ensure_helm() {
  if ! command -v go >/dev/null; then
    log "the Go toolchain is needed to build helm ${HELM_VERSION} (go install); install Go 1.24+"
    return 1
  fi
  if [[ "$(installed_helm_version)" == "$HELM_VERSION" ]]; then
    log "helm ${HELM_VERSION} cached at ${HELM}"
    return 0
  fi
  log "building helm ${HELM_VERSION} into ${GOBIN} (several minutes on 2 cores, once)"
  mkdir -p "$GOBIN"
  local started=$SECONDS
  go install "${HELM_MODULE}/cmd/helm@${HELM_VERSION}"
  log "helm built in $((SECONDS - started))s"
}

ensure_validator() {
  if ! "$PYTHON" -c "import kubernetes_validate, jsonschema, yaml" 2>/dev/null; then
    log "installing kubernetes-validate into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
    "$PYTHON" -m pip install -q "kubernetes-validate>=1.33"
  fi
}

lint_chart() {
  "$HELM" lint --strict --kube-version "$KUBE_VERSION" "$CHART"
  "$HELM" lint --strict --kube-version "$KUBE_VERSION" -f "$ALL_ON" "$CHART"
  "$HELM" lint --strict --kube-version "$KUBE_VERSION" -f "$ALL_ON" "${TLS_ON[@]}" "$CHART"
}

render_and_check() {
  local out=$WORK
  local render=("$HELM" template tagstream "$CHART" --namespace tagstream --kube-version "$KUBE_VERSION")
  "${render[@]}" >"$out/default.yaml"
  "${render[@]}" -f "$ALL_ON" >"$out/all-on.yaml"
  "${render[@]}" -f "$ALL_ON" --set autoscaling.kind=hpa >"$out/hpa.yaml"
  "${render[@]}" -f "$ALL_ON" "${TLS_ON[@]}" >"$out/tls.yaml"
  local core=(--expect-kind Deployment --expect-kind ConfigMap --expect-kind Service
    --expect-kind ServiceAccount --expect-kind PodDisruptionBudget)
  "$PYTHON" ci/check_manifests.py --kube-version "$KUBE_VERSION" "${core[@]}" "$out/default.yaml"
  "$PYTHON" ci/check_manifests.py --kube-version "$KUBE_VERSION" "${core[@]}" \
    --expect-kind ScaledObject --expect-kind TriggerAuthentication --expect-kind ServiceMonitor \
    --expect-kind PrometheusRule "$out/all-on.yaml"
  "$PYTHON" ci/check_manifests.py --kube-version "$KUBE_VERSION" "${core[@]}" \
    --expect-kind HorizontalPodAutoscaler --expect-kind ServiceMonitor --expect-kind PrometheusRule \
    "$out/hpa.yaml"
  "$PYTHON" ci/check_manifests.py --kube-version "$KUBE_VERSION" "${core[@]}" \
    --expect-kind ScaledObject --expect-kind TriggerAuthentication --expect-kind ServiceMonitor \
    --expect-kind PrometheusRule "$out/tls.yaml"
}

compose_command() {
  if docker compose version >/dev/null 2>&1; then
    echo "docker compose"
    return 0
  fi
  if ! command -v docker-compose >/dev/null; then
    # To stderr: this function's stdout is the command it names.
    log "installing Debian's docker-compose (its 'config' needs no engine)" >&2
    apt-get update -q >/dev/null && apt-get install -y -q docker-compose >/dev/null 2>&1
  fi
  echo "docker-compose"
}

validate_compose() {
  local compose
  read -r -a compose <<<"$(compose_command)"
  log "compose: $("${compose[@]}" version 2>/dev/null | head -n 1)"
  "${compose[@]}" -f docker-compose.yml config -q
  "${compose[@]}" -f docker-compose.yml --profile gpu --profile monitoring config -q
  log "docker-compose.yml valid (default, gpu and monitoring profiles)"
}

ensure_helm
ensure_validator
if [[ ${1:-} == "--tools-only" ]]; then
  log "tools ready (helm ${HELM_VERSION}, kubernetes-validate)"
  exit 0
fi
lint_chart
render_and_check
validate_compose
log "all deployment checks passed"
