{{/* The name of the chart's objects: the release name, with the chart name unless it has it. */}}
{{- define "outbox-relay.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels that select the relay pods. */}}
{{- define "outbox-relay.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: outbox-relay
{{- end -}}

{{/* Labels of every object. */}}
{{- define "outbox-relay.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "outbox-relay.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The Secret holding the relay's database URL and optional credentials. */}}
{{- define "outbox-relay.secretName" -}}
{{- if .Values.secrets.existingSecret -}}
{{- .Values.secrets.existingSecret -}}
{{- else -}}
{{- include "outbox-relay.fullname" . -}}
{{- end -}}
{{- end -}}

{{- define "outbox-relay.hasKafkaSaslPassword" -}}
{{- if .Values.secrets.existingSecret -}}
{{- if .Values.secrets.existingSecretHas.kafkaSaslPassword }}true{{ end -}}
{{- else if .Values.secrets.kafkaSaslPassword }}true{{ end -}}
{{- end -}}

{{- define "outbox-relay.hasAdminToken" -}}
{{- if .Values.secrets.existingSecret -}}
{{- if .Values.secrets.existingSecretHas.adminToken }}true{{ end -}}
{{- else if .Values.secrets.adminToken }}true{{ end -}}
{{- end -}}

{{/* OUTBOX_SHARDS, refusing values the relay would refuse. */}}
{{- define "outbox-relay.shardsEnv" -}}
{{- $shards := int .Values.shards -}}
{{- if or (lt $shards 0) (gt $shards 1024) -}}
{{- fail (printf "shards must be 0 (unsharded) or 1 to 1024, not %d" $shards) -}}
{{- end -}}
{{- if gt $shards 0 -}}
- name: OUTBOX_SHARDS
  value: {{ $shards | quote }}
{{- end -}}
{{- end -}}
