{{/*
Names and labels.
*/}}
{{- define "orthrus.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The RayService name, which every other object's name starts with. KubeRay
refuses RayService names over 47 characters or not DNS-1035 (letter first),
because it derives its cluster and Service names from it.
*/}}
{{- define "orthrus.fullname" -}}
{{- $name := "" }}
{{- if .Values.fullnameOverride }}
{{- $name = .Values.fullnameOverride }}
{{- else if contains (include "orthrus.name" .) .Release.Name }}
{{- $name = .Release.Name }}
{{- else }}
{{- $name = printf "%s-%s" .Release.Name (include "orthrus.name" .) }}
{{- end }}
{{- $name = $name | trunc 47 | trimSuffix "-" }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "the RayService name %q must be a DNS-1035 label (lower-case letters, digits and '-', starting with a letter); pick another release name or set fullnameOverride" $name) }}
{{- end }}
{{- $name }}
{{- end }}

{{- define "orthrus.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "orthrus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "orthrus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "orthrus.labels" -}}
helm.sh/chart: {{ include "orthrus.chart" . }}
{{ include "orthrus.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: orthrus-serve
{{- end }}

{{- define "orthrus.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The one Orthrus application of the Serve config (the schema allows exactly one).
*/}}
{{- define "orthrus.app" -}}
{{- index .Values.serve.applications 0 | toJson }}
{{- end }}

{{/*
The deployment of that application whose replicas host an engine (one per GPU), as JSON:
OrthrusServer (args.topology colocated, as gpu.yaml) or OrthrusEngine (split, the default).
*/}}
{{- define "orthrus.engineDeployment" -}}
{{- $app := include "orthrus.app" . | fromJson }}
{{- $args := default dict $app.args }}
{{- $name := ternary "OrthrusServer" "OrthrusEngine" (eq (toString (default "split" $args.topology)) "colocated") }}
{{- $found := dict }}
{{- range $app.deployments }}
{{- if eq .name $name }}
{{- $found = . }}
{{- end }}
{{- end }}
{{- if not $found }}
{{- fail (printf "serve.applications[0].deployments has no deployment named %s (args.topology %s): the chart sizes the GPU worker group from it" $name (toString (default "split" $args.topology))) }}
{{- end }}
{{- $found | toJson }}
{{- end }}

{{/*
Worker-group size from the engine's replica settings (one engine replica per
worker pod): {"min", "max", "initial", "autoscale"}. Serve's own defaults apply
to missing keys (min_replicas 1, max_replicas 1, num_replicas 1).
*/}}
{{- define "orthrus.workerBounds" -}}
{{- $dep := include "orthrus.engineDeployment" . | fromJson }}
{{- $min := 1 }}
{{- $max := 1 }}
{{- $initial := 1 }}
{{- if hasKey $dep "autoscaling_config" }}
{{- $as := $dep.autoscaling_config }}
{{- $min = int (default 1 (get $as "min_replicas")) }}
{{- if and (hasKey $as "min_replicas") (eq (toString $as.min_replicas) "0") }}
{{- $min = 0 }}
{{- end }}
{{- $max = int (default 1 (get $as "max_replicas")) }}
{{- $initial = $min }}
{{- if and (hasKey $as "initial_replicas") (not (kindIs "invalid" $as.initial_replicas)) }}
{{- $initial = int $as.initial_replicas }}
{{- end }}
{{- if lt $max $min }}
{{- fail (printf "%s autoscaling_config: max_replicas (%d) must be >= min_replicas (%d)" $dep.name $max $min) }}
{{- end }}
{{- if or (lt $initial $min) (gt $initial $max) }}
{{- fail (printf "%s autoscaling_config: initial_replicas (%d) must lie between min_replicas (%d) and max_replicas (%d)" $dep.name $initial $min $max) }}
{{- end }}
{{- else }}
{{- $n := 1 }}
{{- if hasKey $dep "num_replicas" }}
{{- $n = int $dep.num_replicas }}
{{- end }}
{{- $min = $n }}
{{- $max = $n }}
{{- $initial = $n }}
{{- end }}
{{- dict "min" $min "max" $max "initial" $initial "autoscale" (gt $max $min) | toJson }}
{{- end }}

{{- define "orthrus.httpPort" -}}
{{- dig "http_options" "port" 8000 .Values.serve | int }}
{{- end }}

{{- define "orthrus.grpcPort" -}}
{{- dig "grpc_options" "port" 9000 .Values.serve | int }}
{{- end }}

{{/*
The Orthrus replicas' metrics port; "" when args.metrics_port is null (off).
A missing key means the application's default, 8085.
*/}}
{{- define "orthrus.metricsPort" -}}
{{- $app := include "orthrus.app" . | fromJson }}
{{- $port := dig "args" "metrics_port" 8085 $app }}
{{- if not (kindIs "invalid" $port) }}{{ int $port }}{{ end }}
{{- end }}

{{/*
How the API keys reach the application when apiKeys.enabled: "file" when the
Serve config names an api_keys_file (the Secret is mounted there and the
application re-reads it, so rotating the Secret needs no restart), else "env"
(the variable named by api_keys_env, read once at start), else "".
*/}}
{{- define "orthrus.apiKeysMode" -}}
{{- if .Values.apiKeys.enabled }}
{{- $app := include "orthrus.app" . | fromJson }}
{{- if dig "args" "api_keys_file" "" $app }}file{{ else if dig "args" "api_keys_env" "" $app }}env{{ end }}
{{- end }}
{{- end }}

{{- define "orthrus.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "orthrus.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{/*
The Secret key: the user's for an existing Secret, else the one the chart wrote
in the format of the mode (comma-separated for env, one per line for file).
*/}}
{{- define "orthrus.apiKeysSecretKey" -}}
{{- if .Values.apiKeys.existingSecret }}{{ .Values.apiKeys.existingSecretKey }}
{{- else if eq (include "orthrus.apiKeysMode" .) "file" }}api-keys.txt
{{- else }}api-keys{{ end }}
{{- end }}

{{/*
The Secret volume and its mount for file mode (nothing otherwise). The whole
directory is mounted, not a subPath, so that Kubernetes can update the file.
*/}}
{{- define "orthrus.apiKeysVolume" -}}
{{- if eq (include "orthrus.apiKeysMode" .) "file" }}
{{- $app := include "orthrus.app" . | fromJson }}
- name: api-keys
  secret:
    secretName: {{ include "orthrus.apiKeysSecretName" . }}
    defaultMode: 288  # 0440: owner and group (fsGroup) read
    items:
      - key: {{ include "orthrus.apiKeysSecretKey" . }}
        path: {{ base $app.args.api_keys_file }}
{{- end }}
{{- end }}

{{- define "orthrus.apiKeysMount" -}}
{{- if eq (include "orthrus.apiKeysMode" .) "file" }}
{{- $app := include "orthrus.app" . | fromJson }}
- name: api-keys
  mountPath: {{ dir $app.args.api_keys_file }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
Where the engine finds its checkpoint inside a worker pod ("" = the embedded model).
*/}}
{{- define "orthrus.modelPath" -}}
{{- $m := .Values.model }}
{{- $root := trimSuffix "/" $m.mountPath }}
{{- if eq $m.source "image" }}
{{- $m.image.path }}
{{- else if eq $m.source "pvc" }}
{{- if $m.pvc.path }}{{ printf "%s/%s" $root $m.pvc.path }}{{ else }}{{ $root }}{{ end }}
{{- else if eq $m.source "hub" }}
{{- printf "%s/%s" $root (replace "/" "--" $m.hub.repoId) }}
{{- end }}
{{- end }}

{{/*
The Serve config for serveConfigV2: .Values.serve as it stands, with the
engine's model path filled in from model.source.
*/}}
{{- define "orthrus.serveConfig" -}}
{{- $serve := deepCopy .Values.serve }}
{{- $app := index $serve.applications 0 }}
{{- $path := include "orthrus.modelPath" . }}
{{- if $path }}
{{- if not (hasKey $app "args") }}
{{- $_ := set $app "args" dict }}
{{- end }}
{{- if not (hasKey $app.args "engine") }}
{{- $_ := set $app.args "engine" dict }}
{{- end }}
{{- if not (kindIs "invalid" (get $app.args.engine "model")) }}
{{- fail (printf "model.source is %q, so the chart sets the engine's model path itself: leave serve.applications[0].args.engine.model null" .Values.model.source) }}
{{- end }}
{{- $_ := set $app.args.engine "model" $path }}
{{- end }}
{{- if .Values.compileCache.enabled }}
{{- if not (hasKey $app "args") }}
{{- $_ := set $app "args" dict }}
{{- end }}
{{- if not (hasKey $app.args "engine") }}
{{- $_ := set $app.args "engine" dict }}
{{- end }}
{{- if and (hasKey $app.args.engine "compile_cache_dir") (not (kindIs "invalid" (get $app.args.engine "compile_cache_dir"))) }}
{{- fail "compileCache.enabled: the chart sets the engine's compile_cache_dir to compileCache.mountPath itself: leave serve.applications[0].args.engine.compile_cache_dir null (or disable compileCache)" }}
{{- end }}
{{- $_ := set $app.args.engine "compile_cache_dir" .Values.compileCache.mountPath }}
{{- end }}
{{- toYaml $serve }}
{{- end }}

{{/*
Consistency between the Serve config and the pods it runs on, checked before
anything is rendered: each failure names the setting to change.
*/}}
{{- define "orthrus.checks" -}}
{{- $dep := include "orthrus.engineDeployment" . | fromJson }}
{{- $opts := default dict $dep.ray_actor_options }}
{{- $gpus := float64 (default 0 (get $opts "num_gpus")) }}
{{- $cpus := float64 (default 1 (get $opts "num_cpus")) }}
{{- $app := include "orthrus.app" . | fromJson }}
{{- $device := dig "args" "engine" "device" "auto" $app | default "auto" }}
{{- $perPod := int .Values.workers.gpusPerPod }}
{{- if gt $perPod 0 }}
{{- if ne $gpus (float64 $perPod) }}
{{- fail (printf "workers.gpusPerPod (%d) must equal %s ray_actor_options.num_gpus (%v): the chart runs one engine replica per worker pod" $perPod $dep.name $gpus) }}
{{- end }}
{{- else }}
{{- if gt $gpus 0.0 }}
{{- fail (printf "workers.gpusPerPod is 0 (CPU-only) but %s ray_actor_options.num_gpus is %v: set num_gpus to 0" $dep.name $gpus) }}
{{- end }}
{{- if hasPrefix "cuda" $device }}
{{- fail (printf "workers.gpusPerPod is 0 (CPU-only) but the engine's device is %q: use cpu or auto" $device) }}
{{- end }}
{{- $headCpus := get .Values.head.rayStartParams "num-cpus" }}
{{- if and $headCpus (le $cpus (float64 $headCpus)) }}
{{- fail (printf "%s needs %v CPUs and no GPU, which fits the head (head.rayStartParams.num-cpus %s), where the model is not mounted: give the engine more num_cpus than the head offers" $dep.name $cpus $headCpus) }}
{{- end }}
{{- end }}
{{- if and .Values.apiKeys.enabled (not (include "orthrus.apiKeysMode" .)) }}
{{- fail "apiKeys.enabled needs serve.applications[0].args.api_keys_file (where the chart mounts the keys) or api_keys_env (the variable it passes them in)" }}
{{- end }}
{{- $keysFile := dig "args" "api_keys_file" "" $app | default "" }}
{{- if $keysFile }}
{{- $keysDir := dir $keysFile }}
{{- if has $keysDir (list "/tmp" "/home/ray" "/dev/shm" (trimSuffix "/" .Values.model.mountPath)) }}
{{- fail (printf "args.api_keys_file %q: the chart mounts the keys Secret on %s, which already holds another volume; pick a directory of its own, e.g. /etc/orthrus/keys" $keysFile $keysDir) }}
{{- end }}
{{- if not .Values.apiKeys.enabled }}
{{- $mounted := false }}
{{- range .Values.extraVolumeMounts }}
{{- if eq (trimSuffix "/" .mountPath) $keysDir }}{{ $mounted = true }}{{ end }}
{{- end }}
{{- if not $mounted }}
{{- fail (printf "args.api_keys_file is %q but apiKeys.enabled is false and no extraVolumeMounts entry mounts %s: the application would not start without the file" $keysFile $keysDir) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.monitoring.enabled (eq .Values.monitoring.kind "ServiceMonitor") (not .Values.services.metrics.enabled) }}
{{- fail "monitoring.kind ServiceMonitor scrapes the metrics Service: set services.metrics.enabled true (or use PodMonitor)" }}
{{- end }}
{{- end }}

{{/*
Environment shared by the Ray containers. HOME and caches point at emptyDir
volumes so that the root filesystem can stay read-only.
*/}}
{{- define "orthrus.env" -}}
- name: HOME
  value: /home/ray
- name: XDG_CACHE_HOME
  value: /home/ray/.cache
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- if eq .Values.ingress "haproxy" }}
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
- name: RAY_SERVE_THROUGHPUT_OPTIMIZED
  value: "1"
{{- end }}
{{- if eq (include "orthrus.apiKeysMode" .) "env" }}
{{- $app := include "orthrus.app" . | fromJson }}
- name: {{ $app.args.api_keys_env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "orthrus.apiKeysSecretName" . }}
      key: {{ include "orthrus.apiKeysSecretKey" . }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Container ports shared by head and workers: Serve's HTTP and gRPC proxies (on
every node), Ray's metrics export and the Orthrus replica's metrics.
*/}}
{{- define "orthrus.servePorts" -}}
- name: serve
  containerPort: {{ include "orthrus.httpPort" . }}
  protocol: TCP
- name: grpc
  containerPort: {{ include "orthrus.grpcPort" . }}
  protocol: TCP
- name: metrics
  containerPort: 8080
  protocol: TCP
{{- with include "orthrus.metricsPort" . }}
- name: orthrus-metrics
  containerPort: {{ . }}
  protocol: TCP
{{- end }}
{{- end }}

{{- define "orthrus.writableMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/ray
- name: dshm
  mountPath: /dev/shm
{{- end }}

{{- define "orthrus.writableVolumes" -}}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm }}
{{- end }}

{{/*
rayStartParams with Ray's metrics export on 8080, the port the pods declare and
Prometheus scrapes (the chart owns this one setting).
*/}}
{{- define "orthrus.rayStartParams" -}}
{{- $params := deepCopy (default dict .) }}
{{- $_ := set $params "metrics-export-port" "8080" }}
{{- range $k, $v := $params }}
{{ $k }}: {{ $v | quote }}
{{- end }}
{{- end }}
