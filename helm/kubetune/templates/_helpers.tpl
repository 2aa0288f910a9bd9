{{/* Names, labels and the operator's command line. */}}

{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name: "<release>-kubetune", or the release name when it holds "kubetune". */}}
{{- define "kubetune.fullname" -}}
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

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The operator pods' identity (stable across upgrades). */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The metrics Service; a ServiceMonitor names its scrape job after it, so alerts select job="<this>". */}}
{{- define "kubetune.metricsServiceName" -}}
{{- printf "%s-metrics" (include "kubetune.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The scrape job of the trainer pods: a PodMonitor's job is "<namespace>/<name>". */}}
{{- define "kubetune.trainerPodMonitorName" -}}
{{- printf "%s-trainer" (include "kubetune.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubetune.image" -}}
{{- $tag := default .Chart.AppVersion .image.tag }}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/* The peering object's name (kopf.dev ClusterKopfPeering, or KopfPeering per namespace). */}}
{{- define "kubetune.peeringName" -}}
{{- default (include "kubetune.fullname" .) .Values.operator.peering.name }}
{{- end }}

{{/* Watched namespaces, validated: namespaced RBAC needs a list of them. */}}
{{- define "kubetune.watchNamespaces" -}}
{{- if and .Values.rbac.namespaced (empty .Values.operator.watchNamespaces) }}
{{- fail "rbac.namespaced=true needs operator.watchNamespaces: the namespaces whose FineTuneJobs the operator runs" }}
{{- end }}
{{- toJson (.Values.operator.watchNamespaces | default list) }}
{{- end }}

{{/* `kubetune operator` flags, as a YAML list. */}}
{{- define "kubetune.operatorArgs" -}}
{{- $v := .Values }}
{{- $args := list "operator" }}
{{- $namespaces := include "kubetune.watchNamespaces" . | fromJsonArray }}
{{- range $namespaces }}
{{- $args = append $args (printf "--namespace=%s" .) }}
{{- else }}
{{- $args = append $args "--all-namespaces" }}
{{- end }}
{{- if $v.operator.peering.enabled }}
{{- $args = append $args (printf "--peering=%s" (include "kubetune.peeringName" .)) }}
{{- $args = append $args (printf "--peering-lifetime=%d" (int $v.operator.peering.lifetime)) }}
{{- else }}
{{- $args = append $args "--standalone" }}
{{- end }}
{{- $args = append $args (printf "--metrics-port=%d" (int $v.operator.metricsPort)) }}
{{- $args = append $args (printf "--liveness-port=%d" (int $v.operator.livenessPort)) }}
{{- $args = append $args (printf "--trainer-image=%s" (include "kubetune.image" (dict "image" $v.trainer.image "Chart" .Chart))) }}
{{- $args = append $args (printf "--image-pull-policy=%s" $v.trainer.image.pullPolicy) }}
{{- with $v.trainer.serviceAccountName }}
{{- $args = append $args (printf "--service-account=%s" .) }}
{{- end }}
{{- $args = append $args (printf "--storage-secret=%s" $v.trainer.storageSecret) }}
{{- if not $v.trainer.securityContext.restricted }}
{{- $args = append $args "--no-restricted-security-context" }}
{{- end }}
{{- $args = append $args (printf "--run-as-user=%d" (int $v.trainer.securityContext.runAsUser)) }}
{{- $args = append $args (printf "--trainer-metrics-port=%d" (int $v.trainer.metricsPort)) }}
{{- if not $v.trainer.readProgress }}
{{- $args = append $args "--no-trainer-progress" }}
{{- end }}
{{- range $key, $value := $v.trainer.validation.nodeSelector }}
{{- $args = append $args (printf "--validation-node-selector=%s=%s" $key $value) }}
{{- end }}
{{- range $v.trainer.validation.tolerations }}
{{- $t := .key }}
{{- if .value }}{{ $t = printf "%s=%s" $t .value }}{{ end }}
{{- if .effect }}{{ $t = printf "%s:%s" $t .effect }}{{ end }}
{{- $args = append $args (printf "--validation-toleration=%s" $t) }}
{{- end }}
{{- if $v.operator.verbose }}
{{- $args = append $args "--verbose" }}
{{- end }}
{{- range $v.operator.extraArgs }}
{{- $args = append $args . }}
{{- end }}
{{- toYaml $args }}
{{- end }}
