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

{{/*
The relay container, as one item of a `containers` (or `initContainers`) list: image, `run`,
configuration file and secrets as *_FILE variables, admin port, probes, resources, security
context and mounts. The Deployment renders it; in `mode: sidecar` it is also a native sidecar
(`restartPolicy: Always`, a startup probe on /healthz) and runs as the relay's user itself, since
the host pod's security context is the service's. Called with this chart's scope.
*/}}
{{- define "outbox-relay.container" -}}
{{- $sidecar := eq .Values.mode "sidecar" -}}
- name: outbox-relay
  image: {{ include "outbox-relay.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if and $sidecar .Values.sidecar.native }}
  restartPolicy: Always
  {{- end }}
  args: ["run"]
  env:
    - name: OUTBOX_CONFIG
      value: /etc/outbox/relay.toml
    - name: OUTBOX_DATABASE_URL_FILE
      value: /var/run/secrets/outbox/database-url
    {{- if include "outbox-relay.hasKafkaSaslPassword" . }}
    - name: OUTBOX_KAFKA__PROPERTIES__SASL_PASSWORD_FILE
      value: /var/run/secrets/outbox/kafka-sasl-password
    {{- end }}
    {{- if include "outbox-relay.hasAdminToken" . }}
    - name: OUTBOX_ADMIN__TOKEN_FILE
      value: /var/run/secrets/outbox/admin-token
    {{- end }}
    - name: OUTBOX_ADMIN_ADDR
      value: {{ printf "0.0.0.0:%d" (int .Values.admin.port) | quote }}
    {{- with include "outbox-relay.shardsEnv" . }}
    {{- . | nindent 4 }}
    {{- end }}
    - name: OUTBOX_TELEMETRY__ENABLED
      value: {{ .Values.otel.enabled | quote }}
    {{- if .Values.otel.enabled }}
    {{- with .Values.otel.endpoint }}
    - name: OUTBOX_TELEMETRY__OTLP_ENDPOINT
      value: {{ . | quote }}
    {{- end }}
    - name: OUTBOX_TELEMETRY__SERVICE_NAME
      value: {{ .Values.otel.serviceName | quote }}
    {{- end }}
    - name: OUTBOX_LOG_FORMAT
      value: {{ .Values.log.format | quote }}
    - name: RUST_LOG
      value: {{ .Values.log.rustLog | quote }}
    {{- with .Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: relay-admin
      containerPort: {{ .Values.admin.port }}
      protocol: TCP
  {{- if $sidecar }}
  {{- with .Values.sidecar.startupProbe }}
  startupProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- end }}
  {{- with .Values.livenessProbe }}
  livenessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.readinessProbe }}
  readinessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- if $sidecar }}
    {{- $user := pick .Values.podSecurityContext "runAsNonRoot" "runAsUser" "runAsGroup" }}
    {{- toYaml (merge (deepCopy .Values.securityContext) $user) | nindent 4 }}
    {{- else }}
    {{- toYaml .Values.securityContext | nindent 4 }}
    {{- end }}
  volumeMounts:
    - name: relay-config
      mountPath: /etc/outbox/relay.toml
      subPath: relay.toml
      readOnly: true
    - name: relay-secrets
      mountPath: /var/run/secrets/outbox
      readOnly: true
    {{- with .Values.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/*
The relay's volumes, as items of a pod's `volumes` list: the ConfigMap with relay.toml and the
Secret. In `mode: sidecar` the Secret's files are readable by any user (0444): the host pod's
fsGroup is the service's, and only the relay container mounts the volume.
*/}}
{{- define "outbox-relay.volumes" -}}
- name: relay-config
  configMap:
    name: {{ include "outbox-relay.fullname" . }}
- name: relay-secrets
  secret:
    secretName: {{ include "outbox-relay.secretName" . }}
    defaultMode: {{ if eq .Values.mode "sidecar" }}0444{{ else }}0440{{ end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "outbox-relay.requireSidecarMode" -}}
{{- if ne .Values.mode "sidecar" -}}
{{- fail (printf "outbox-relay.%s needs the outbox-relay chart's `mode: sidecar` (mode %q also renders a Deployment of relays)" .what .Values.mode) -}}
{{- end -}}
{{- end -}}

{{/*
PUBLIC, for the chart of the service the relay runs next to, with this chart as a dependency in
`mode: sidecar`. Pass this chart's scope, `(index .Subcharts "outbox-relay")` (or the alias):

  initContainers:            # native sidecar (Kubernetes >= 1.29; `sidecar.native: false`:
                             # put it under `containers` instead)
    {{- include "outbox-relay.sidecarContainer" (index .Subcharts "outbox-relay") | nindent 8 }}
  volumes:
    {{- include "outbox-relay.sidecarVolumes" (index .Subcharts "outbox-relay") | nindent 8 }}

and, to restart the pods when relay.toml changes, the pod annotation
  checksum/outbox-relay-config: {{ include "outbox-relay.configChecksum" (index .Subcharts "outbox-relay") }}
*/}}
{{- define "outbox-relay.sidecarContainer" -}}
{{- include "outbox-relay.requireSidecarMode" (dict "Values" .Values "what" "sidecarContainer") -}}
{{- include "outbox-relay.container" . -}}
{{- end -}}

{{/* PUBLIC: the sidecar's volumes (see outbox-relay.sidecarContainer). */}}
{{- define "outbox-relay.sidecarVolumes" -}}
{{- include "outbox-relay.requireSidecarMode" (dict "Values" .Values "what" "sidecarVolumes") -}}
{{- include "outbox-relay.volumes" . -}}
{{- end -}}

{{/* PUBLIC: a checksum of relay.toml, for a pod annotation that rolls the pods on a change. */}}
{{- define "outbox-relay.configChecksum" -}}
{{- .Values.config | sha256sum -}}
{{- end -}}
