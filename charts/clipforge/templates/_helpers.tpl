{{/*
Names, labels and the pieces every pod shares. Selectors use name + instance only.
*/}}

{{- define "clipforge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "clipforge.fullname" -}}
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

{{- define "clipforge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The run id (a pipeline's own run_id must be the same: clipforge.checks). */}}
{{- define "clipforge.runId" -}}
{{- required "set runId (a DNS label of at most 40 characters, e.g. the git SHA)" .Values.runId }}
{{- end }}

{{/* The pipeline spec as JSON: the inline mapping, or the parsed --set-file text ({"Error": …} if no YAML map). */}}
{{- define "clipforge.spec" -}}
{{- if kindIs "string" .Values.pipeline }}{{ .Values.pipeline | fromYaml | toJson }}{{ else }}{{ .Values.pipeline | toJson }}{{ end }}
{{- end }}

{{/*
What the values schema cannot say, each failing the install with one sentence rather than a pod later.
Included once, by configmap.yaml.
*/}}
{{- define "clipforge.checks" -}}
{{- $spec := include "clipforge.spec" . | fromJson }}
{{- $runId := include "clipforge.runId" . }}
{{- if and (not .Values.image.digest) (eq (lower (toString .Values.image.tag)) "latest") }}
{{- fail "image.tag: \"latest\" moves with every push, so a retried pod could run other code than the first: pin a tag (e.g. the git SHA) or set image.digest" }}
{{- end }}
{{- if not (hasKey $spec "Error") }}{{/* configmap.yaml says what is wrong with a file that is no spec */}}
{{- if and $spec.run_id (ne (toString $spec.run_id) $runId) }}
{{- fail (printf "pipeline: its run_id %q is not runId %q, the id the driver runs it as: set runId=%s, or drop run_id from the spec" (toString $spec.run_id) $runId (toString $spec.run_id)) }}
{{- end }}
{{- if not (include "clipforge.artifacts" .) }}
{{- if not $spec.artifacts }}
{{- fail "pipeline: no artifacts: set artifactStore.s3.bucket (or artifactStore.persistentVolumeClaim.claimName), or the spec's artifacts" }}
{{- else if regexMatch "^s3://my-bucket(/|$)" (toString $spec.artifacts) }}
{{- /* The example bucket of values.yaml and jobs/*.yaml, which an inline pipeline without artifacts inherits. */}}
{{- fail (printf "pipeline: artifacts %s is the examples' placeholder bucket (the chart's default, which an inline pipeline without artifacts inherits): set artifactStore.s3.bucket (or artifactStore.persistentVolumeClaim.claimName), or the spec's artifacts" (toString $spec.artifacts)) }}
{{- end }}
{{- end }}
{{- end }}
{{- $driverAccount := include "clipforge.serviceAccountName" . }}
{{- if eq $driverAccount (include "clipforge.stageServiceAccountName" .) }}
{{- fail (printf "stageServiceAccount.name (or stageDefaults.serviceAccountName): %q is also the driver's ServiceAccount, whose Role creates Jobs: give the stage pods another one" $driverAccount) }}
{{- end }}
{{- range $where, $labels := dict "stageDefaults.labels" .Values.stageDefaults.labels "stageDefaults.podLabels" .Values.stageDefaults.podLabels "driver.podLabels" .Values.driver.podLabels }}
{{- range $key, $_ := $labels }}
{{- if regexMatch "^(app\\.kubernetes\\.io/(name|instance)|clipforge\\.io/.*)$" $key }}
{{- fail (printf "%s: %q is one of the chart's own labels, which select the release's pods and a run's Jobs: use another key" $where $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A Job name from (prefix, run id, component): `<prefix>-<runId>-<component>`, or over 63 characters its
first 52 characters (trailing '-' dropped) + '-' + 10 hex digits of the sha256 of the full name.
The same algorithm as clipforge.orchestrate.k8s_manifests.job_name (a test compares them).
DESIGN: every Job name carries the run id (Job specs are immutable), and names are at most 63 characters.
*/}}
{{- define "clipforge.jobName" -}}
{{- $full := printf "%s-%s-%s" .prefix .runId .component }}
{{- $name := $full }}
{{- if not (regexMatch "^[a-z]" $full) }}{{ $name = printf "cf-%s" $full }}{{ end }}
{{- if gt (len $name) 63 }}
{{- $name = printf "%s-%s" (regexReplaceAll "-+$" ($name | trunc 52) "") ($full | sha256sum | trunc 10) }}
{{- end }}
{{- $name }}
{{- end }}

{{- define "clipforge.driverJobName" -}}
{{- include "clipforge.jobName" (dict "prefix" (include "clipforge.fullname" .) "runId" (include "clipforge.runId" .) "component" "driver") }}
{{- end }}

{{- define "clipforge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "clipforge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "clipforge.labels" -}}
helm.sh/chart: {{ include "clipforge.chart" . }}
{{ include "clipforge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: clipforge
{{- end }}

{{- define "clipforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "clipforge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- if and .Values.rbac.create (not .Values.serviceAccount.name) }}
{{- /* The Role would be bound to the namespace's "default" ServiceAccount: every pod there could make Jobs. */}}
{{- fail "serviceAccount.name: with serviceAccount.create=false and rbac.create=true, name the ServiceAccount the driver's Role is bound to (binding the namespace's default one would let every pod there create Jobs)" }}
{{- end }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The stage pods' ServiceAccount (the helm test pod runs as it too, so it checks what stages will see):
stageDefaults.serviceAccountName when set (an existing one), else the one stageServiceAccount creates or
names; empty: the namespace's default.
*/}}
{{- define "clipforge.stageServiceAccountName" -}}
{{- if .Values.stageDefaults.serviceAccountName }}
{{- .Values.stageDefaults.serviceAccountName }}
{{- else if .Values.stageServiceAccount.create }}
{{- default (printf "%s-stage" (include "clipforge.fullname" . | trunc 57 | trimSuffix "-")) .Values.stageServiceAccount.name }}
{{- else }}
{{- .Values.stageServiceAccount.name }}
{{- end }}
{{- end }}

{{- define "clipforge.createStageServiceAccount" -}}
{{- if and .Values.stageServiceAccount.create (not .Values.stageDefaults.serviceAccountName) }}true{{ end }}
{{- end }}

{{- define "clipforge.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end }}
{{- end }}

{{/* The artifact store root the driver uses instead of the pipeline's `artifacts`; empty: keep it. */}}
{{- define "clipforge.artifacts" -}}
{{- $store := .Values.artifactStore }}
{{- if and $store.s3.bucket $store.persistentVolumeClaim.claimName }}
{{- fail "artifactStore: set s3.bucket or persistentVolumeClaim.claimName, not both" }}
{{- else if $store.s3.bucket }}
{{- printf "s3://%s/%s" $store.s3.bucket ($store.s3.prefix | trimAll "/") | trimSuffix "/" }}
{{- else if $store.persistentVolumeClaim.claimName }}
{{- printf "/artifacts/%s" ($store.persistentVolumeClaim.prefix | trimAll "/") | trimSuffix "/" }}
{{- end }}
{{- end }}

{{/* Environment for the artifact store: the S3 endpoint and region (the Secret comes in by envFrom). */}}
{{- define "clipforge.artifactEnv" -}}
{{- $s3 := .Values.artifactStore.s3 }}
{{- $env := dict }}
{{- if $s3.endpoint }}{{ $_ := set $env "AWS_ENDPOINT_URL" $s3.endpoint }}{{ end }}
{{- if $s3.region }}{{ $_ := set $env "AWS_DEFAULT_REGION" $s3.region }}{{ end }}
{{- toJson $env }}
{{- end }}

{{/*
Pod and container security of every pod: values.yaml's (k8s_manifests.POD_SECURITY / CONTAINER_SECURITY) with the
user's merged over them by Helm; the driver passes them on to stage pods.
*/}}
{{- define "clipforge.podSecurityContext" -}}
{{- toYaml (.Values.podSecurityContext | default dict) }}
{{- end }}

{{- define "clipforge.containerSecurityContext" -}}
{{- toYaml (.Values.containerSecurityContext | default dict) }}
{{- end }}

{{/* Environment and mounts of pods that reach the artifact store (driver, helm test). */}}
{{- define "clipforge.storeEnv" -}}
{{- range $key, $value := (include "clipforge.artifactEnv" . | fromJson) }}
- name: {{ $key }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}

{{- define "clipforge.storeEnvFrom" -}}
{{- with .Values.artifactStore.s3.existingSecret }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
{{- end }}

{{/*
The driver's, prune's and helm test's CPU pods: they share driver.* placement and pod metadata.
cpuPodMetadata takes (dict "root" $ "labels" <the chart's labels> "annotations" <the chart's, or nil>); the
chart's win over driver.podLabels / podAnnotations (selectors, the run id and Helm's hooks depend on them).
*/}}
{{- define "clipforge.cpuPodMetadata" -}}
labels:
  {{- toYaml (merge .labels .root.Values.driver.podLabels) | nindent 2 }}
{{- with merge (.annotations | default dict) .root.Values.driver.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Resources of the driver's, prune's and helm test's pod from (dict "root" $ "resources" <driver or prune resources>):
with stageDefaults.resources.limitCpu (a ResourceQuota that counts limits.cpu refuses a pod without one), a CPU
limit equal to the CPU request unless the values give one.
*/}}
{{- define "clipforge.cpuPodResources" -}}
{{- $resources := deepCopy (.resources | default dict) }}
{{- $cpu := dig "requests" "cpu" "" $resources }}
{{- if and .root.Values.stageDefaults.resources.limitCpu $cpu (not (dig "limits" "cpu" "" $resources)) }}
{{- $_ := set $resources "limits" (merge (dict "cpu" $cpu) ($resources.limits | default dict)) }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{- define "clipforge.cpuPodPlacement" -}}
{{- with .Values.driver.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.driver.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.driver.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
No GPUs: the CUDA base image says NVIDIA_VISIBLE_DEVICES=all, so where nvidia is a GPU node's default runtime
a CPU pod would see (and could take) every GPU of the node. Then the artifact store's endpoint and region.
*/}}
{{- define "clipforge.cpuPodEnv" -}}
- name: NVIDIA_VISIBLE_DEVICES
  value: void
{{- include "clipforge.storeEnv" . }}
{{- end }}

{{/* emptyDirs for a read-only root filesystem: /tmp and the caches under /cache. */}}
{{- define "clipforge.volumeMounts" -}}
- name: config
  mountPath: /etc/clipforge
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /cache
{{- if .Values.artifactStore.persistentVolumeClaim.claimName }}
- name: artifacts
  mountPath: /artifacts
{{- end }}
{{- end }}

{{- define "clipforge.volumes" -}}
- name: config
  configMap:
    name: {{ include "clipforge.fullname" . }}-pipeline
- name: tmp
  emptyDir: {}
- name: cache
  emptyDir:
    sizeLimit: 1Gi
{{- with .Values.artifactStore.persistentVolumeClaim.claimName }}
- name: artifacts
  persistentVolumeClaim:
    claimName: {{ . }}
{{- end }}
{{- end }}
