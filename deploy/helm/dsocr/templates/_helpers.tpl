{{/* The release's resource name: RELEASE-dsocr, or RELEASE when it already says dsocr. */}}
{{- define "dsocr.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dsocr.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dsocr.labels" -}}
{{ include "dsocr.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The Secret holding DSOCR_API_KEY, or "" for none. */}}
{{- define "dsocr.secretName" -}}
{{- if .Values.existingSecret -}}
{{- .Values.existingSecret -}}
{{- else if .Values.apiKey -}}
{{- include "dsocr.fullname" . -}}
{{- end -}}
{{- end -}}

{{/* The Host names the server answers: its Service's names inside the cluster, and allowedHosts. */}}
{{- define "dsocr.allowedHosts" -}}
{{- $svc := include "dsocr.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) -}}
{{- concat $names .Values.allowedHosts | join "," -}}
{{- end -}}
