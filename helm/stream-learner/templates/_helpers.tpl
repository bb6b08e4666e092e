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
The image tag of a pod with this many GPUs: (list $ <gpus> "<value naming them>"). Empty image.tag:
the chart's appVersion, or "<appVersion>-cuda" when the pod has GPUs (the CUDA image's tag,
docs/deploy.md): the CPU image would compute on the CPU while holding the GPU. An explicit tag
without "-cuda" and GPUs requested fails the render, unless image.allowNonCudaTagWithGpu says that
image has CUDA torch under another name.
*/}}
{{- define "stream-learner.tagFor" -}}
{{- $root := index . 0 }}
{{- $gpus := int (index . 1) }}
{{- $what := index . 2 }}
{{- $tag := $root.Values.image.tag }}
{{- if not $tag }}
{{- $tag = ternary (printf "%s-cuda" $root.Chart.AppVersion) $root.Chart.AppVersion (gt $gpus 0) }}
{{- else if and (gt $gpus 0) (not (hasSuffix "-cuda" $tag)) (not $root.Values.image.allowNonCudaTagWithGpu) }}
{{- fail (printf "image.tag %q with %s=%d: a GPU needs the CUDA image, tagged \"<version>-cuda\" (docs/deploy.md); the CPU image would compute on the CPU while holding the GPU. Set image.tag to \"%s-cuda\", or leave it empty for \"<appVersion>-cuda\", or set image.allowNonCudaTagWithGpu=true if %q has CUDA torch" $tag $what $gpus $tag $tag) }}
{{- end }}
{{- $tag }}
{{- end }}

{{/* The learner's image tag (gpu.count). */}}
{{- define "stream-learner.tag" -}}
{{- include "stream-learner.tagFor" (list . .Values.gpu.count "gpu.count") }}
{{- end }}

{{- define "stream-learner.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "stream-learner.tag" .) }}
{{- end }}

{{/* The inference server's image: the learner's repository, tagged for serving.gpu.count. */}}
{{- define "stream-learner.serving.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "stream-learner.serving.tag" .) }}
{{- end }}

{{- define "stream-learner.serving.tag" -}}
{{- include "stream-learner.tagFor" (list . .Values.serving.gpu.count "serving.gpu.count") }}
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

{{/* "true" when config.publish.storage_url is a local path (file://), which only its own pod can see. */}}
{{- define "stream-learner.fileStore" -}}
{{- if hasPrefix "file:" .Values.config.publish.storage_url }}true{{- end }}
{{- end }}

{{/* Where the writable caches go (an emptyDir: the root filesystem is read-only). */}}
{{- define "stream-learner.cacheDir" -}}/var/cache/stream-learner{{- end }}

{{/*
The env every stream-learner container gets, learner or inference server: writable caches on the
read-only root filesystem, the hub's offline mode, and the S3 credentials from their Secret.
*/}}
{{- define "stream-learner.commonEnv" -}}
{{- $cacheDir := include "stream-learner.cacheDir" . -}}
# Writable caches on the read-only root filesystem.
- name: HF_HOME
  value: {{ $cacheDir }}/huggingface
- name: XDG_CACHE_HOME
  value: {{ $cacheDir }}
- name: TORCH_HOME
  value: {{ $cacheDir }}/torch
- name: MPLCONFIGDIR
  value: {{ $cacheDir }}/matplotlib
# training.compile: inductor's and Triton's compiled kernels (Triton's default, ~/.triton,
# is on the read-only root filesystem)
- name: TORCHINDUCTOR_CACHE_DIR
  value: {{ $cacheDir }}/torchinductor
- name: TRITON_CACHE_DIR
  value: {{ $cacheDir }}/triton
- name: TMPDIR
  value: /tmp
- name: HF_HUB_OFFLINE
  value: {{ ternary "1" "0" .Values.hfHubOffline | quote }}
{{- with .Values.s3Credentials }}
{{- if .existingSecret }}
- name: STREAM_LEARNER_PUBLISH__S3_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .accessKeyIdKey }}
- name: STREAM_LEARNER_PUBLISH__S3_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .secretAccessKeyKey }}
{{- end }}
{{- end }}
{{- end }}

{{/* The mounts every stream-learner container has: the settings file and the writable scratch space. */}}
{{- define "stream-learner.commonVolumeMounts" -}}
- name: config
  mountPath: {{ include "stream-learner.configPath" . }}
  subPath: config.yaml
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: {{ include "stream-learner.cacheDir" . }}
{{- end }}

{{/* Their volumes: the ConfigMap and two emptyDirs. */}}
{{- define "stream-learner.commonVolumes" -}}
- name: config
  configMap:
    name: {{ include "stream-learner.fullname" . }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.scratch.tmpSizeLimit }}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.scratch.cacheSizeLimit }}
{{- end }}

{{/*
A container's resources: the given requests and limits, plus <gpu.resourceName>: <count> in the
limits when the count is > 0: (list $ <resources> <count>).
*/}}
{{- define "stream-learner.resourcesWithGpus" -}}
{{- $root := index . 0 }}
{{- $resources := deepCopy (index . 1) }}
{{- $gpus := int (index . 2) }}
{{- if gt $gpus 0 }}
{{- $limits := $resources.limits | default dict }}
{{- $_ := set $limits $root.Values.gpu.resourceName ($gpus | toString) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/* The config checksum annotation: a changed setting restarts the pod (the file is read once, at start). */}}
{{- define "stream-learner.configChecksum" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}

{{/* ---------------------------------------------------------------- the inference server */}}

{{/*
The inference server's name and full name: "<name>-serving", "<fullname>-serving". Its pods must not
carry the learner's selector labels (name + instance, immutable), or the learner's Service,
ServiceMonitor and PodDisruptionBudget would select them: their app.kubernetes.io/name differs.
*/}}
{{- define "stream-learner.serving.name" -}}
{{- printf "%s-serving" (include "stream-learner.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "stream-learner.serving.fullname" -}}
{{- printf "%s-serving" (include "stream-learner.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the inference server's pods; never change them after install. */}}
{{- define "stream-learner.serving.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stream-learner.serving.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of the inference server's objects. */}}
{{- define "stream-learner.serving.labels" -}}
helm.sh/chart: {{ include "stream-learner.chart" . }}
{{ include "stream-learner.serving.selectorLabels" . }}
app.kubernetes.io/version: {{ include "stream-learner.serving.tag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: serving
app.kubernetes.io/part-of: {{ include "stream-learner.name" . }}
{{- end }}

{{/*
The inference server's terminationGracePeriodSeconds: its preStop sleep, then its own graceful stop
(GRACEFUL_S = 10 s in stream_learner/service/serving/server.py: the requests in flight are answered),
plus terminationGraceMarginSeconds for the process to exit.
*/}}
{{- define "stream-learner.serving.terminationGracePeriodSeconds" -}}
{{- add .Values.serving.preStopSleepSeconds 10 .Values.terminationGraceMarginSeconds }}
{{- end }}

{{/*
Fails the render when the inference server's replicas could not read the learner's versions: a
file:// store is a directory of the learner's pod, unless it is on a claim every pod can mount
(persistence.enabled with ReadWriteMany). Also one GPU per replica at most.
*/}}
{{- define "stream-learner.serving.check" -}}
{{- if include "stream-learner.fileStore" . }}
{{- if not (and .Values.persistence.enabled (has "ReadWriteMany" .Values.persistence.accessModes)) }}
{{- fail (printf "serving.enabled: the inference server's replicas read the versions the learner publishes, but config.publish.storage_url %s is a directory of the learner's pod, which other pods cannot read. Use an object store all pods reach (config.publish.storage_url=s3://bucket/prefix), or put the file store on a claim every pod can mount: persistence.enabled=true with persistence.accessModes=[ReadWriteMany] (a storage class that offers it, e.g. NFS or CephFS)" .Values.config.publish.storage_url) }}
{{- end }}
{{- end }}
{{- if gt (int .Values.serving.gpu.count) 1 }}
{{- fail (printf "serving.gpu.count=%d: an inference server computes on one device, so the other GPUs of the replica would sit idle. Use serving.gpu.count=1 and more serving.replicas" (int .Values.serving.gpu.count)) }}
{{- end }}
{{- end }}
