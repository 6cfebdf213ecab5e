{{/* Object name prefix: fullnameOverride or the release name. */}}
{{- define "bulkhead.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "bulkhead.labels" -}}
app.kubernetes.io/name: bulkhead
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "learner"). */}}
{{- define "bulkhead.selectorLabels" -}}
app.kubernetes.io/name: bulkhead
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "bulkhead.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The gRPC URL the agents dial. */}}
{{- define "bulkhead.learnerUrl" -}}
{{- if .Values.agents.learnerUrl -}}
{{ .Values.agents.learnerUrl }}
{{- else -}}
{{ ternary "https" "http" .Values.tls.enabled }}://{{ include "bulkhead.fullname" . }}-learner.{{ .Release.Namespace }}.svc:{{ .Values.learner.grpcPort }}
{{- end -}}
{{- end -}}

{{/* "host:port" for a bind address that may be an IPv6 literal in brackets. */}}
{{- define "bulkhead.listen" -}}
{{ .address }}:{{ .port }}
{{- end -}}

{{/* The database URL for the learner (database.type=sqlite only; the other types pass
     it through the environment so the password stays in a Secret). */}}
{{- define "bulkhead.sqliteUrl" -}}
sqlite:///var/lib/bulkhead/learner.db
{{- end -}}

{{/* Pod-level security context shared by every pod: the runtime's default seccomp
     profile (which admits bpf(), perf_event_open() and setns() to holders of the
     capabilities below, and refuses the rest of the kernel's rarer surface). */}}
{{- define "bulkhead.seccomp" -}}
seccompProfile:
  type: RuntimeDefault
{{- end -}}
