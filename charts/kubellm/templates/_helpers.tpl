{{/*
Names. Kubernetes names and label values are at most 63 characters: every helper truncates to 63
and trims a trailing "-". Names of parts (NAME-router, NAME-operator, ...) shorten the fullname
first, so the suffix always survives and two parts never collide.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "kubellm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* RELEASE-NAME, or RELEASE when it already contains the name, or fullnameOverride. */}}
{{- define "kubellm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* CHART-VERSION, for the helm.sh/chart label. */}}
{{- define "kubellm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
FULLNAME-PART, at most 63 characters (or .max), for a part of the release.
Usage: include "kubellm.componentName" (dict "ctx" $ "component" "router")
*/}}
{{- define "kubellm.componentName" -}}
{{- $max := int (default 63 .max) -}}
{{- $base := include "kubellm.fullname" .ctx | trunc (int (sub (sub $max 1) (len .component))) | trimSuffix "-" -}}
{{- printf "%s-%s" $base .component | trunc $max | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every resource. */}}
{{- define "kubellm.labels" -}}
helm.sh/chart: {{ include "kubellm.chart" . }}
{{ include "kubellm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubellm
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The labels that select the release's pods (never change them: selectors are immutable). */}}
{{- define "kubellm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubellm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/* Labels of one part. Usage: include "kubellm.componentLabels" (dict "ctx" $ "component" "router") */}}
{{- define "kubellm.componentLabels" -}}
{{ include "kubellm.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Selector labels of one part. */}}
{{- define "kubellm.componentSelectorLabels" -}}
{{ include "kubellm.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
The ServiceAccount of a part (operator or router): serviceAccount.name, else FULLNAME-PART when the
chart creates it, else "default".
Usage: include "kubellm.serviceAccountName" (dict "ctx" $ "component" "router")
*/}}
{{- define "kubellm.serviceAccountName" -}}
{{- $sa := (index .ctx.Values .component).serviceAccount -}}
{{- if $sa.create -}}
{{- default (include "kubellm.componentName" .) $sa.name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- default "default" $sa.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The Secret the operator renders the router config into (and the only Secret routers may read). */}}
{{- define "kubellm.configSecretName" -}}
{{- include "kubellm.componentName" (dict "ctx" . "component" "router-config") -}}
{{- end -}}

{{/* The operator's leader-election Lease. */}}
{{- define "kubellm.leaseName" -}}
{{- include "kubellm.componentName" (dict "ctx" . "component" "operator") -}}
{{- end -}}

{{/* The ConfigMap with the router `settings` block the operator renders into every config. */}}
{{- define "kubellm.settingsName" -}}
{{- include "kubellm.componentName" (dict "ctx" . "component" "settings") -}}
{{- end -}}

{{/* The master key Secret: masterKey.existingSecret, or the generated FULLNAME-master-key. */}}
{{- define "kubellm.masterKeySecretName" -}}
{{- if .Values.masterKey.existingSecret -}}
{{- .Values.masterKey.existingSecret -}}
{{- else -}}
{{- include "kubellm.componentName" (dict "ctx" . "component" "master-key") -}}
{{- end -}}
{{- end -}}

{{/* Redis names (52 characters at most: StatefulSet pods add a revision-hash label of the name). */}}
{{- define "kubellm.redis.fullname" -}}
{{- include "kubellm.componentName" (dict "ctx" . "component" "redis" "max" 52) -}}
{{- end -}}

{{- define "kubellm.redis.headlessName" -}}
{{- include "kubellm.componentName" (dict "ctx" . "component" "redis-headless") -}}
{{- end -}}

{{/* Whether the routers share state through Redis (in-chart or external). */}}
{{- define "kubellm.redis.used" -}}
{{- $x := .Values.externalRedis -}}
{{- if or .Values.redis.enabled $x.url $x.nodes $x.sentinels -}}true{{- end -}}
{{- end -}}

{{/* The Redis URL the routers and the operator get in KUBELLM_REDIS_URL (never with a password). */}}
{{- define "kubellm.redis.url" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s.%s.svc:%d/0" (include "kubellm.redis.fullname" .) .Release.Namespace (int .Values.redis.port) -}}
{{- else -}}
{{- .Values.externalRedis.url -}}
{{- end -}}
{{- end -}}

{{/* The Secret (and key) with the Redis password; empty when there is none. */}}
{{- define "kubellm.redis.passwordSecretName" -}}
{{- if .Values.redis.enabled -}}
{{- if .Values.redis.auth.enabled -}}
{{- default (include "kubellm.redis.fullname" .) .Values.redis.auth.existingSecret -}}
{{- end -}}
{{- else if include "kubellm.redis.used" . -}}
{{- .Values.externalRedis.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "kubellm.redis.passwordSecretKey" -}}
{{- if .Values.redis.enabled -}}
{{- .Values.redis.auth.existingSecretPasswordKey -}}
{{- else -}}
{{- .Values.externalRedis.existingSecretPasswordKey -}}
{{- end -}}
{{- end -}}

{{/* The image of a part: repository, then @digest or :tag (default: the chart's appVersion). */}}
{{- define "kubellm.image" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository (toString (default .appVersion .tag)) -}}
{{- end -}}
{{- end -}}

{{/*
The environment both the operator and the routers get: where Redis is and its password. The
rendered router settings name these variables (redis.urlEnv, redis.passwordEnv), so the URL and the
password never appear in the rendered config Secret.
*/}}
{{- define "kubellm.redisEnv" -}}
{{- if include "kubellm.redis.used" . }}
- name: KUBELLM_REDIS_URL
  value: {{ include "kubellm.redis.url" . | quote }}
{{- with include "kubellm.redis.passwordSecretName" . }}
- name: KUBELLM_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "kubellm.redis.passwordSecretKey" $ }}
{{- end }}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.existingSecret .Values.externalRedis.sentinelPasswordKey }}
- name: KUBELLM_REDIS_SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalRedis.existingSecret }}
      key: {{ .Values.externalRedis.sentinelPasswordKey }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
The router `settings` block (RouterSettings, docs/config.md) the operator puts into every rendered
config: router.settings, with the parts the chart wires itself (master key, drain, Redis) on top.
*/}}
{{- define "kubellm.routerSettings" -}}
{{- $settings := deepCopy (default dict .Values.router.settings) -}}
{{- $_ := set $settings "masterKeyEnv" "KUBELLM_MASTER_KEY" -}}
{{- $_ := set $settings "drainDelaySeconds" .Values.router.drainDelaySeconds -}}
{{- with .Values.router.sinks -}}
{{- $_ := set $settings "sinks" . -}}
{{- end -}}
{{- if include "kubellm.redis.used" . -}}
{{- $redis := dict "urlEnv" "KUBELLM_REDIS_URL" "keyPrefix" .Values.redis.keyPrefix "failOpen" .Values.redis.failOpen -}}
{{- if include "kubellm.redis.passwordSecretName" . -}}
{{- $_ := set $redis "passwordEnv" "KUBELLM_REDIS_PASSWORD" -}}
{{- end -}}
{{- $x := .Values.externalRedis -}}
{{- if and (not .Values.redis.enabled) (ne $x.mode "standalone") -}}
{{- $_ := set $redis "mode" $x.mode -}}
{{- with $x.nodes }}{{ $_ := set $redis "nodes" . }}{{ end -}}
{{- with $x.sentinels }}{{ $_ := set $redis "sentinels" . }}{{ end -}}
{{- with $x.masterName }}{{ $_ := set $redis "masterName" . }}{{ end -}}
{{- if and $x.existingSecret $x.sentinelPasswordKey -}}
{{- $_ := set $redis "sentinelPasswordEnv" "KUBELLM_REDIS_SENTINEL_PASSWORD" -}}
{{- end -}}
{{- end -}}
{{- if and (not .Values.redis.enabled) $x.ledgerWaitReplicas -}}
{{- $_ := set $redis "ledgerWaitReplicas" $x.ledgerWaitReplicas -}}
{{- end -}}
{{- $_ := set $settings "redis" $redis -}}
{{- end -}}
{{- toYaml $settings -}}
{{- end -}}

{{/* Fail early on combinations the schema cannot express. */}}
{{- define "kubellm.validate" -}}
{{- if and .Values.redis.enabled .Values.externalRedis.url -}}
{{- fail "redis.enabled and externalRedis.url are both set: use the in-chart Redis or an external one, not both" -}}
{{- end -}}
{{- if and .Values.externalRedis.url (contains "@" .Values.externalRedis.url) -}}
{{- fail "externalRedis.url must not contain credentials: put the password in externalRedis.existingSecret" -}}
{{- end -}}
{{- $x := .Values.externalRedis -}}
{{- if and .Values.redis.enabled (ne $x.mode "standalone") -}}
{{- fail (printf "externalRedis.mode %s needs redis.enabled=false: the in-chart Redis is one server" $x.mode) -}}
{{- end -}}
{{- if and (eq $x.mode "sentinel") (not (and $x.sentinels $x.masterName)) -}}
{{- fail "externalRedis.mode sentinel needs externalRedis.sentinels and externalRedis.masterName" -}}
{{- end -}}
{{- if and (eq $x.mode "cluster") (not (or $x.url $x.nodes)) -}}
{{- fail "externalRedis.mode cluster needs externalRedis.url or externalRedis.nodes" -}}
{{- end -}}
{{- if and (ne $x.mode "standalone") (contains "{" .Values.redis.keyPrefix) (eq $x.mode "cluster") -}}
{{- fail "redis.keyPrefix must not contain a {hash tag} in cluster mode: every key would land in one slot" -}}
{{- end -}}
{{- $declared := list -}}
{{- range .Values.router.sinkCredentials }}{{ $declared = append $declared .name }}{{ end -}}
{{- range .Values.router.extraEnv }}{{ $declared = append $declared .name }}{{ end -}}
{{- range $i, $sink := .Values.router.sinks -}}
{{- range $k, $v := $sink -}}
{{- if and (hasSuffix "Env" $k) (not (has $v $declared)) -}}
{{- fail (printf "router.sinks[%d].%s names %s, which neither router.sinkCredentials nor router.extraEnv sets" $i $k $v) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.router.autoscaling.enabled (gt (int .Values.router.autoscaling.minReplicas) (int .Values.router.autoscaling.maxReplicas)) -}}
{{- fail "router.autoscaling.minReplicas must not exceed maxReplicas" -}}
{{- end -}}
{{- end -}}

{{/*
Seconds a terminating router pod gets: the preStop sleep, the drain delay, the grace period for
in-flight requests, and 5 seconds of margin (unless router.terminationGracePeriodSeconds is set).
*/}}
{{- define "kubellm.router.terminationGracePeriodSeconds" -}}
{{- if not (kindIs "invalid" .Values.router.terminationGracePeriodSeconds) -}}
{{- .Values.router.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add (int .Values.router.preStopSleepSeconds) (int .Values.router.drainDelaySeconds) (int .Values.router.gracePeriodSeconds) 5 -}}
{{- end -}}
{{- end -}}
