{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "tagstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart, unless the release name already contains it. */}}
{{- define "tagstream.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tagstream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The standard app.kubernetes.io labels, on every resource. */}}
{{- define "tagstream.labels" -}}
helm.sh/chart: {{ include "tagstream.chart" . }}
{{ include "tagstream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tagstream
{{- end }}

{{/* The labels that select this release's worker pods (immutable once deployed). */}}
{{- define "tagstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tagstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "tagstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tagstream.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tagstream.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* Whether SASL credentials are in use; fails when they would have nowhere to come from. */}}
{{- define "tagstream.saslEnabled" -}}
{{- if .Values.kafka.sasl.mechanism }}
{{- $_ := required "kafka.sasl.existingSecret is required when kafka.sasl.mechanism is set: the chart reads SASL credentials from an existing Secret only" .Values.kafka.sasl.existingSecret }}
{{- if not (hasPrefix "SASL_" .Values.kafka.securityProtocol) }}
{{- fail (printf "kafka.sasl.mechanism needs kafka.securityProtocol SASL_PLAINTEXT or SASL_SSL, not %s" .Values.kafka.securityProtocol) }}
{{- end }}true
{{- end }}
{{- end }}

{{/*
The autoscaler's ceiling: autoscaling.maxReplicas, else kafka.partitions. A consumer group
gives each partition to one member, so replicas beyond the partition count would sit idle.
*/}}
{{- define "tagstream.maxReplicas" -}}
{{- $partitions := int .Values.kafka.partitions }}
{{- $max := int (default $partitions .Values.autoscaling.maxReplicas) }}
{{- if gt $max $partitions }}
{{- fail (printf "autoscaling.maxReplicas (%d) exceeds kafka.partitions (%d): the extra consumers would be idle" $max $partitions) }}
{{- end }}
{{- if lt $max (int .Values.autoscaling.minReplicas) }}
{{- fail (printf "autoscaling.maxReplicas (%d) is below autoscaling.minReplicas (%d)" $max (int .Values.autoscaling.minReplicas)) }}
{{- end }}
{{- $max }}
{{- end }}

{{/* KEDA's name for the SASL mechanism. */}}
{{- define "tagstream.kedaSasl" -}}
{{- $mechanisms := dict "PLAIN" "plaintext" "SCRAM-SHA-256" "scram_sha256" "SCRAM-SHA-512" "scram_sha512" }}
{{- get $mechanisms .Values.kafka.sasl.mechanism }}
{{- end }}

{{/* Whether the connection to Kafka uses TLS. */}}
{{- define "tagstream.kafkaTls" -}}
{{- if has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") }}true{{- end }}
{{- end }}

{{/*
Whether TLS files come from kafka.tls.existingSecret; fails on a combination the worker could
not use. Every file is optional on its own: the CA alone verifies the brokers, the certificate
and key together add mutual TLS.
*/}}
{{- define "tagstream.tlsEnabled" -}}
{{- $tls := .Values.kafka.tls }}
{{- if $tls.existingSecret }}
{{- if not (include "tagstream.kafkaTls" .) }}
{{- fail (printf "kafka.tls.existingSecret needs kafka.securityProtocol SSL or SASL_SSL, not %s: with %s the worker would not use the mounted TLS files" .Values.kafka.securityProtocol .Values.kafka.securityProtocol) }}
{{- end }}
{{- if and $tls.certificateKey (not $tls.keyKey) }}
{{- fail "kafka.tls.certificateKey needs kafka.tls.keyKey: mutual TLS takes the client certificate and its private key together" }}
{{- end }}
{{- if and $tls.keyKey (not $tls.certificateKey) }}
{{- fail "kafka.tls.keyKey needs kafka.tls.certificateKey: mutual TLS takes the client certificate and its private key together" }}
{{- end }}
{{- if and $tls.keyPasswordKey (not $tls.keyKey) }}
{{- fail "kafka.tls.keyPasswordKey needs kafka.tls.keyKey: the password decrypts the client private key" }}
{{- end }}
{{- if not (or $tls.caKey $tls.certificateKey) }}
{{- fail "kafka.tls.existingSecret is set but names no file: set kafka.tls.caKey (server verification) and/or kafka.tls.certificateKey with kafka.tls.keyKey (mutual TLS)" }}
{{- end }}
{{- $keys := compact (list $tls.caKey $tls.certificateKey $tls.keyKey $tls.keyPasswordKey) }}
{{- if ne (len $keys) (len (uniq $keys)) }}
{{- fail (printf "kafka.tls.caKey, certificateKey, keyKey and keyPasswordKey must name different keys of the Secret, got %s" (join ", " $keys)) }}
{{- end }}
{{- $mount := trimSuffix "/" $tls.mountPath }}
{{- if has $mount (list "/tmp" (trimSuffix "/" .Values.modelCache.mountPath)) }}
{{- fail (printf "kafka.tls.mountPath (%s) would hide another volume of the worker (/tmp, modelCache.mountPath)" $tls.mountPath) }}
{{- end }}
{{- $pod := .Values.podSecurityContext | default (dict) }}
{{- if and (not $pod.fsGroup) (ne (toString $pod.runAsUser) "0") }}
{{- fail "kafka.tls.existingSecret needs podSecurityContext.fsGroup: the mounted files belong to root and that group, through which the non-root worker reads them" }}
{{- end }}
{{- if include "tagstream.tlsConfigOverrides" . }}
{{- fail (printf "config sets %s, which kafka.tls sets from the mounted Secret: remove it from config" (include "tagstream.tlsConfigOverrides" .)) }}
{{- end }}true
{{- else if or $tls.certificateKey $tls.keyKey $tls.keyPasswordKey }}
{{- fail "kafka.tls.certificateKey, keyKey and keyPasswordKey need kafka.tls.existingSecret: the chart reads TLS files from an existing Secret only" }}
{{- end }}
{{- end }}

{{/* The TAGSTREAM_SSL_* keys of `config` (comma-separated), which kafka.tls owns. */}}
{{- define "tagstream.tlsConfigOverrides" -}}
{{- $names := list }}
{{- range $name, $_ := .Values.config }}
{{- if hasPrefix "TAGSTREAM_SSL_" $name }}
{{- $names = append $names $name }}
{{- end }}
{{- end }}
{{- join ", " $names }}
{{- end }}

{{/* Where a key of kafka.tls.existingSecret is mounted: the file is named after the key. */}}
{{- define "tagstream.tlsFile" -}}
{{- printf "%s/%s" (trimSuffix "/" .root.Values.kafka.tls.mountPath) .key }}
{{- end }}

{{/* kafka.tls.defaultMode as the integer Kubernetes wants (0400 and 0440 arrive as 256 and 288). */}}
{{- define "tagstream.tlsDefaultMode" -}}
{{- $modes := dict "256" 256 "288" 288 "0400" 256 "0440" 288 }}
{{- $mode := toString .Values.kafka.tls.defaultMode }}
{{- if not (hasKey $modes $mode) }}
{{- fail (printf "kafka.tls.defaultMode must be 0400 or 0440, not %s" $mode) }}
{{- end }}
{{- get $modes $mode }}
{{- end }}

{{/* Refuses passwords in `config`: the ConfigMap is not a Secret. */}}
{{- define "tagstream.checkConfigSecrets" -}}
{{- range $name, $_ := .Values.config }}
{{- if contains "PASSWORD" $name }}
{{- fail (printf "config.%s would put a password into the ConfigMap: use kafka.sasl.existingSecret, kafka.tls.keyPasswordKey or an extraEnv entry with a secretKeyRef" $name) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Refuses a grace period the worker's own shutdown could outlast. */}}
{{- define "tagstream.checkGracePeriod" -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (int .Values.shutdownTimeoutSeconds) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be larger than shutdownTimeoutSeconds (%d), or the kubelet kills a worker that is still committing" (int .Values.terminationGracePeriodSeconds) (int .Values.shutdownTimeoutSeconds)) }}
{{- end }}
{{- end }}
