{{/* Namespace of all namespaced objects. */}}
{{- define "sluice.namespace" -}}
{{- .Values.namespace | default .Release.Namespace -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "sluice.labels" -}}
{{ include "sluice.selectorLabels" . }}
app.kubernetes.io/part-of: sluice
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels: fixed, so a DaemonSet selector never changes across upgrades. */}}
{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: sluice-agent
{{- end -}}

{{- define "sluice.image" -}}
{{- printf "%s:%s" .Values.image.repository (toString .Values.image.tag) -}}
{{- end -}}

{{/* Reject settings the mounts cannot serve. */}}
{{- define "sluice.validate" -}}
{{- $run := trimSuffix "/" .Values.agent.runDir -}}
{{- if not (hasPrefix (printf "%s/" $run) .Values.agent.stateDir) -}}
{{- fail "agent.stateDir must be under agent.runDir" -}}
{{- end -}}
{{- if not (hasPrefix (printf "%s/" $run) .Values.agent.controlSocket) -}}
{{- fail "agent.controlSocket must be under agent.runDir" -}}
{{- end -}}
{{- if not (hasPrefix "/sys/fs/bpf/" .Values.agent.pinRoot) -}}
{{- fail "agent.pinRoot must be under /sys/fs/bpf" -}}
{{- end -}}
{{- if and .Values.agent.cgroup (not (hasPrefix "/sys/fs/cgroup" .Values.agent.cgroup)) -}}
{{- fail "agent.cgroup must be under /sys/fs/cgroup" -}}
{{- end -}}
{{- end -}}
