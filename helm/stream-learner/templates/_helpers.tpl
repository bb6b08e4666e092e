{{/* Chart name, overridable. */}}
{{- define "stream-learner.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name when it already contains the chart name.
Truncated to 63 characters (DNS label limit).
*/}}
{{- define "stream-learner.fullname" -}}
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

{{- define "stream-learner.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "stream-learner.labels" -}}
helm.sh/chart: {{ include "stream-learner.chart" . }}
{{ include "stream-learner.selectorLabels" . }}
app.kubernetes.io/version: {{ include "stream-learner.tag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: learner
{{- end }}

{{/* Labels that select the learner's pod; never change them after install (immutable selector). */}}
{{- define "stream-learner.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stream-learner.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "stream-learner.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "stream-learner.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image tag. Empty image.tag: the chart's appVersion, or "<appVersion>-cuda" when gpu.count > 0
(the CUDA image's tag, docs/deploy.md): the CPU image would train on the CPU while holding the GPU.
An explicit tag without "-cuda" and GPUs requested fails the render, unless
image.allowNonCudaTagWithGpu says that image has CUDA torch under another name.
*/}}
{{- define "stream-learner.tag" -}}
{{- $gpus := int .Values.gpu.count }}
{{- $tag := .Values.image.tag }}
{{- if not $tag }}
{{- $tag = ternary (printf "%s-cuda" .Chart.AppVersion) .Chart.AppVersion (gt $gpus 0) }}
{{- else if and (gt $gpus 0) (not (hasSuffix "-cuda" $tag)) (not .Values.image.allowNonCudaTagWithGpu) }}
{{- fail (printf "image.tag %q with gpu.count=%d: a GPU needs the CUDA image, tagged \"<version>-cuda\" (docs/deploy.md); the CPU image would train on the CPU while holding the GPU. Set image.tag to \"%s-cuda\", or leave it empty for \"<appVersion>-cuda\", or set image.allowNonCudaTagWithGpu=true if %q has CUDA torch" $tag $gpus $tag $tag) }}
{{- end }}
{{- $tag }}
{{- end }}

{{- define "stream-learner.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "stream-learner.tag" .) }}
{{- end }}

{{/* Where the container reads its settings file. */}}
{{- define "stream-learner.configPath" -}}/etc/stream-learner/config.yaml{{- end }}

{{/*
The learner's settings: .Values.config, plus the Kafka TLS file locations when kafkaTls is used
(settings the user wrote in config.kafka.client_config win).
*/}}
{{- define "stream-learner.settings" -}}
{{- $cfg := deepCopy .Values.config }}
{{- with .Values.kafkaTls }}
{{- if .existingSecret }}
{{- $client := $cfg.kafka.client_config | default dict }}
{{- $files := dict "ssl.ca.location" .caKey }}
{{- if .certKey }}{{- $_ := set $files "ssl.certificate.location" .certKey }}{{- end }}
{{- if .keyKey }}{{- $_ := set $files "ssl.key.location" .keyKey }}{{- end }}
{{- range $setting, $key := $files }}
{{- if not (hasKey $client $setting) }}
{{- $_ := set $client $setting (printf "%s/%s" (trimSuffix "/" $.Values.kafkaTls.mountPath) $key) }}
{{- end }}
{{- end }}
{{- $_ := set $cfg.kafka "client_config" $client }}
{{- end }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the learner's own stop deadline (publish.stop_timeout_s, within
which it publishes its final version and commits) plus a margin for process exit.
*/}}
{{- define "stream-learner.terminationGracePeriodSeconds" -}}
{{- add (ceil .Values.config.publish.stop_timeout_s | int) .Values.terminationGraceMarginSeconds }}
{{- end }}
