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
{{- printf "%s:%s" .Values.image.repository (toString (.Values.image.tag | default .Chart.AppVersion)) -}}
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

{{/* The node's directories, shared by the agent and the uninstall Jobs (bpffs aside: its
propagation differs). */}}
{{- define "sluice.volumeMounts" -}}
# At the same path as on the host, so that the agent's cgroup2 autodetection (the mount
# of the cgroup2 root) finds the host's hierarchy, not the container's cgroup namespace.
- name: cgroup
  mountPath: /sys/fs/cgroup
# Pod netns bind mounts the runtime creates after the agent started.
- name: netns
  mountPath: {{ .Values.netnsDir }}
  mountPropagation: HostToContainer
# ZDS socket directory shared with ztunnel.
- name: ztunnel
  mountPath: {{ dir .Values.ztunnel.udsAddress }}
# Control socket (sluice-cni on the host connects to it) and pod table.
- name: sluice-run
  mountPath: {{ .Values.agent.runDir }}
# Where the agent installs sluice-cni and chains its entry (istio-cni's paths).
- name: cni-bin-dir
  mountPath: /host/opt/cni/bin
- name: cni-net-dir
  mountPath: /host/etc/cni/net.d
{{- end -}}

{{- define "sluice.volumes" -}}
- name: bpffs
  hostPath:
    path: /sys/fs/bpf
    type: DirectoryOrCreate
- name: cgroup
  hostPath:
    path: /sys/fs/cgroup
    type: Directory
- name: netns
  hostPath:
    path: {{ .Values.netnsDir }}
    type: DirectoryOrCreate
- name: ztunnel
  hostPath:
    path: {{ dir .Values.ztunnel.udsAddress }}
    type: DirectoryOrCreate
- name: sluice-run
  hostPath:
    path: {{ .Values.agent.runDir }}
    type: DirectoryOrCreate
- name: cni-bin-dir
  hostPath:
    path: {{ .Values.cni.binDir }}
    type: DirectoryOrCreate
- name: cni-net-dir
  hostPath:
    path: {{ .Values.cni.confDir }}
    type: DirectoryOrCreate
{{- end -}}
