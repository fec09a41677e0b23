{{/*
Names and labels. Every object carries deploy/base's labels (app.kubernetes.io/name,
part-of, version, component where base has it) and Helm's own (helm.sh/chart,
app.kubernetes.io/managed-by, app.kubernetes.io/instance). Selectors use
app.kubernetes.io/name alone, as deploy/base does.
*/}}

{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Helm's own labels: the chart, who manages the object, the release. */}}
{{- define "finetune-operator.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* deploy/base's `labels:` (kustomization.yaml) and Helm's. */}}
{{- define "finetune-operator.commonLabels" -}}
app.kubernetes.io/part-of: finetune-operator
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{ include "finetune-operator.helmLabels" . }}
{{- end }}

{{/* The labels of an operator object: its name label and the common ones. */}}
{{- define "finetune-operator.labels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
{{ include "finetune-operator.commonLabels" . }}
{{- end }}

{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
{{- end }}

{{/* The monitoring component's labels (deploy/components/monitoring) and monitoring.labels. */}}
{{- define "finetune-operator.monitoringLabels" -}}
app.kubernetes.io/component: monitoring
{{ include "finetune-operator.commonLabels" . }}
{{- with .Values.monitoring.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{ include "finetune-operator.fullname" . }}
{{- end }}

{{/* repository:tag, or repository@digest; the tag defaults to appVersion. */}}
{{- define "finetune-operator.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) }}
{{- end }}
{{- end }}

{{- define "finetune-operator.progressURL" -}}
{{- if .Values.progressURL }}
{{- .Values.progressURL }}
{{- else }}
{{- printf "http://%s.%s.svc:%v/v1/progress" (include "finetune-operator.fullname" .) .Release.Namespace .Values.ports.progress }}
{{- end }}
{{- end }}

{{- define "finetune-operator.peering" -}}
{{- if or .Values.peering.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{/*
The rules of the ClusterRole in one of deploy/base's files, copied into files/ (`make
helm-files`; tests/unit/helm fails when a copy differs from its source): the chart grants
exactly what deploy/base grants, from the same text.
*/}}
{{- define "finetune-operator.clusterRoleRules" -}}
{{- $rules := list }}
{{- range regexSplit "(?m)^---[ \t]*$" (.root.Files.Get .file) -1 }}
{{- $doc := fromYaml . }}
{{- if and $doc (eq (toString $doc.kind) "ClusterRole") }}
{{- $rules = $doc.rules }}
{{- end }}
{{- end }}
{{- if not $rules }}
{{- fail (printf "%s has no ClusterRole with rules" .file) }}
{{- end }}
{{- toYaml $rules }}
{{- end }}
