{{/* Name of the chart, or nameOverride. */}}
{{- define "ssegate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or fullnameOverride. */}}
{{- define "ssegate.fullname" -}}
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

{{/* Standard labels. */}}
{{- define "ssegate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "ssegate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ssegate
{{- end }}

{{/* Selector labels of the gateway pods. */}}
{{- define "ssegate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ssegate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* Name of the Secret holding provider keys and the API-key file. */}}
{{- define "ssegate.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "ssegate.fullname" .) }}
{{- end }}

{{/* Whether a Secret is used at all. */}}
{{- define "ssegate.useSecret" -}}
{{- if or .Values.secrets.existingSecret .Values.secrets.env .Values.secrets.apiKeys }}true{{ end }}
{{- end }}

{{/* Redis URL: the trial Redis, else redis.url, else empty. */}}
{{- define "ssegate.redisUrl" -}}
{{- if .Values.redis.trial.enabled }}
{{- printf "redis://%s-redis:6379/0" (include "ssegate.fullname" .) }}
{{- else }}
{{- .Values.redis.url }}
{{- end }}
{{- end }}

{{/* The ssegate configuration file, built from .Values.config. */}}
{{- define "ssegate.config" -}}
{{- $config := deepCopy .Values.config }}
{{- $server := dict "host" "0.0.0.0" "port" 8000 "workers" (int .Values.ssegate.workers) }}
{{- $_ := set $config "server" (mergeOverwrite (deepCopy (default dict $config.server)) $server) }}
{{- if and (eq .Values.ssegate.configChange "reload") (not (hasKey $config.server "config_watch_interval")) }}
{{- $_ := set $config.server "config_watch_interval" 5 }}
{{- end }}
{{- $redisUrl := include "ssegate.redisUrl" . }}
{{- if $redisUrl }}
{{- $_ := set $config "redis" (mergeOverwrite (deepCopy (default dict $config.redis)) (dict "url" $redisUrl)) }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* config.observability.metrics_port (ssegate's second listener, serving only /metrics), or empty. */}}
{{- define "ssegate.metricsPort" -}}
{{- $port := dig "observability" "metrics_port" nil (.Values.config | default dict) }}
{{- if $port }}
{{- if eq (int $port) 8000 }}
{{- fail "config.observability.metrics_port must differ from 8000, the port of the API (server.port, set by the chart)" }}
{{- end }}
{{- int $port }}
{{- end }}
{{- end }}
