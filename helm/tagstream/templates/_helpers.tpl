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

{{/* Refuses a grace period the worker's own shutdown could outlast. */}}
{{- define "tagstream.checkGracePeriod" -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (int .Values.shutdownTimeoutSeconds) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be larger than shutdownTimeoutSeconds (%d), or the kubelet kills a worker that is still committing" (int .Values.terminationGracePeriodSeconds) (int .Values.shutdownTimeoutSeconds)) }}
{{- end }}
{{- end }}
