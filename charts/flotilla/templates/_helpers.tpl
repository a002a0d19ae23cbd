{{/* Names, labels and small helpers of the Flotilla chart. */}}

{{- define "flotilla.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "flotilla.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "flotilla.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "flotilla.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "flotilla.controllerServiceAccount" -}}
{{- .Values.serviceAccount.controller.name | default (printf "%s-controller" (include "flotilla.fullname" .)) -}}
{{- end -}}

{{- define "flotilla.nodeServiceAccount" -}}
{{- .Values.serviceAccount.node.name | default (printf "%s-node" (include "flotilla.fullname" .)) -}}
{{- end -}}

{{/* the kubelet's plugin directory of this driver */}}
{{- define "flotilla.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletDir) .Values.driverName -}}
{{- end -}}

{{/* pool types whose volumes live on one node (WaitForFirstConsumer) */}}
{{- define "flotilla.nodeLocal" -}}
{{- if has .type (list "nfs") }}false{{ else }}true{{ end -}}
{{- end -}}

{{/* "true" when a pool of type .type is configured (call with dict "root" . "type" T) */}}
{{- define "flotilla.hasPoolType" -}}
{{- $found := false }}
{{- range .root.Values.pools }}{{ if eq .type $.type }}{{ $found = true }}{{ end }}{{ end }}
{{- $found -}}
{{- end -}}

{{/* the host directories lvm and the lvmthin pools write to (docs/lvmthin.md,
Deployment): lvm's own run and lock dirs, /etc/lvm, and every pool's lock_dir (one
under stateDir is mounted with it already) */}}
{{- define "flotilla.lvmDirs" -}}
{{- $dirs := list "/run/lock/lvm" "/run/lvm" "/etc/lvm" }}
{{- $state := printf "%s/" (trimSuffix "/" .Values.stateDir) }}
{{- range .Values.pools }}
{{- $lock := .lock_dir | default "/run/lock/lvm" | trimSuffix "/" }}
{{- if and (eq .type "lvmthin") (not (hasPrefix $state $lock)) }}{{ $dirs = append $dirs $lock }}{{ end }}
{{- end }}
{{- $dirs | uniq | toJson -}}
{{- end -}}

{{/* the driver's pool configuration (pools.yaml) */}}
{{- define "flotilla.poolConfig" -}}
{{- $pools := list }}
{{- range .Values.pools }}
{{- $pools = append $pools (omit . "storageClass") }}
{{- end -}}
pools:
{{- toYaml $pools | nindent 2 }}
allowed_roots:
  - {{ .Values.kubeletDir }}
{{- range .Values.extraAllowedRoots }}
  - {{ . }}
{{- end }}
max_volumes_per_node: {{ .Values.maxVolumesPerNode }}
{{- with .Values.backupTargets }}
backup_targets:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* the Secret with the backup targets' S3 credentials, if any */}}
{{- define "flotilla.backupSecret" -}}
{{- if .Values.backupCredentials.existingSecret -}}
{{ .Values.backupCredentials.existingSecret }}
{{- else if .Values.backupCredentials.create -}}
{{ include "flotilla.fullname" . }}-backup-credentials
{{- end -}}
{{- end -}}

{{/* environment of the driver containers: S3 credentials from the Secret */}}
{{- define "flotilla.backupEnv" -}}
{{- $secret := include "flotilla.backupSecret" . -}}
{{- if and .Values.backupTargets $secret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom: {secretKeyRef: {name: {{ $secret }}, key: accessKeyId, optional: true}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom: {secretKeyRef: {name: {{ $secret }}, key: secretAccessKey, optional: true}}
{{- end }}
{{- end -}}
