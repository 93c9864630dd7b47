{{/*
Names, labels, images and the environment shared by every Beam container.

Every other template asks these helpers for a name, a Secret or an address, so a
switch such as redis.enabled=false changes one place, not five.
*/}}

{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "beam.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified release name. Kept to 37 characters because components append suffixes
and a StatefulSet name must stay within 52 characters (its pods carry a
controller-revision-hash label of name + 11 characters); "-redis-sentinel" is the longest.
*/}}
{{- define "beam.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 37 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 37 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 37 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "beam.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "beam.labels" -}}
helm.sh/chart: {{ include "beam.chart" . }}
app.kubernetes.io/name: {{ include "beam.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: beam
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of one component: call with (dict "context" $ "component" "service"). */}}
{{- define "beam.componentLabels" -}}
{{ include "beam.labels" .context }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Immutable selector labels of one component (never add a label here after a release). */}}
{{- define "beam.selectorLabels" -}}
app.kubernetes.io/name: {{ include "beam.name" .context }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* commonAnnotations, rendered as a block under metadata.annotations when set. */}}
{{- define "beam.commonAnnotations" -}}
{{- with .Values.commonAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
An image reference from {registry, repository, tag, digest}: global.imageRegistry wins over
the image's registry; a digest wins over the tag; an empty tag means the chart's appVersion.
Call with (dict "image" .Values.image "context" $).
*/}}
{{- define "beam.image" -}}
{{- $registry := .image.registry -}}
{{- if .context.Values.global.imageRegistry -}}
{{- $registry = .context.Values.global.imageRegistry -}}
{{- end -}}
{{- $repository := .image.repository -}}
{{- if $registry -}}
{{- $repository = printf "%s/%s" $registry .image.repository -}}
{{- end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (.image.tag | default .context.Chart.AppVersion | toString) -}}
{{- end -}}
{{- end -}}

{{/* imagePullSecrets of a pod: global ones plus the image's own. */}}
{{- define "beam.imagePullSecrets" -}}
{{- $names := concat .context.Values.global.imagePullSecrets (.image.pullSecrets | default list) | uniq -}}
{{- if $names }}
imagePullSecrets:
{{- range $names }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
Pod affinity: the component's own affinity when set, otherwise the anti-affinity preset
("soft" = preferred, "hard" = required, "" = none) spreading pods over nodes.
Call with (dict "component" "redis" "values" .Values.redis "context" $).
*/}}
{{- define "beam.affinity" -}}
{{- if .values.affinity -}}
{{ toYaml .values.affinity }}
{{- else if eq .values.podAntiAffinityPreset "soft" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "beam.selectorLabels" (dict "context" .context "component" .component) | nindent 12 }}
{{- else if eq .values.podAntiAffinityPreset "hard" -}}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- include "beam.selectorLabels" (dict "context" .context "component" .component) | nindent 10 }}
{{- end -}}
{{- end -}}

{{/* The PriorityClass the chart creates for the stateful pods (statefulPriorityClass.create). */}}
{{- define "beam.statefulPriorityClassName" -}}
{{- printf "%s-%s-stateful" (include "beam.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Scheduling fields shared by every pod spec (nodeSelector, tolerations, affinity, spread,
priority; the stateful pods take the chart's PriorityClass when it creates one and their own
priorityClassName is empty). A component with a zoneSpreadPreset ("soft" = ScheduleAnyway, "hard" =
DoNotSchedule) spreads its pods over topology.kubernetes.io/zone unless its own
topologySpreadConstraints are set. Call with (dict "component" "service" "values" .Values.service "context" $).
*/}}
{{- define "beam.scheduling" -}}
{{- $priority := .values.priorityClassName }}
{{- if and (not $priority) .context.Values.statefulPriorityClass.create (has .component (list "redis" "redis-sentinel" "timescaledb")) }}
{{- $priority = include "beam.statefulPriorityClassName" .context }}
{{- end }}
{{- with $priority }}
priorityClassName: {{ . }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $affinity := include "beam.affinity" . }}
{{- if $affinity }}
affinity:
  {{- $affinity | nindent 2 }}
{{- end }}
{{- if .values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml .values.topologySpreadConstraints | nindent 2 }}
{{- else if .values.zoneSpreadPreset }}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: {{ ternary "DoNotSchedule" "ScheduleAnyway" (eq .values.zoneSpreadPreset "hard") }}
    labelSelector:
      matchLabels:
        {{- include "beam.selectorLabels" (dict "context" .context "component" .component) | nindent 8 }}
{{- end }}
{{- end -}}

{{/*
A probe from {enabled, initialDelaySeconds, periodSeconds, timeoutSeconds,
failureThreshold, successThreshold} plus the handler. Call with
(dict "probe" .Values.service.livenessProbe "handler" (dict "httpGet" ...)).
*/}}
{{- define "beam.probe" -}}
{{- toYaml .handler }}
initialDelaySeconds: {{ .probe.initialDelaySeconds }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
successThreshold: {{ .probe.successThreshold }}
{{- end -}}

{{/* ServiceAccount name of a component: call with (dict "component" "service" "values" .Values.service "context" $). */}}
{{- define "beam.serviceAccountName" -}}
{{- if .values.serviceAccount.create -}}
{{- default (printf "%s-%s" (include "beam.fullname" .context) .component) .values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
A generated secret value that survives upgrades: the base64 data of key in Secret name
when that Secret already exists in the release namespace (lookup), otherwise a new random
alphanumeric string. `helm template` and client-side dry runs cannot look up, so they
always show a fresh value; install and upgrade reuse. Call with
(dict "context" $ "name" "beam-redis-auth" "key" "redis-password" "length" 48).

The value is made once per render and remembered in the render's top-level context
(beamGeneratedSecrets, shared by every template of the chart): secrets.yaml and each pod's
checksum/secrets annotation (beam.secretsChecksum) then see the same value, so the
checksum written at install equals the one an upgrade computes from the live Secret.
*/}}
{{- define "beam.secretValue" -}}
{{- if .context.Values.gitops.enabled -}}
{{- fail (printf "gitops.enabled: the chart may not generate Secret %s (it would need lookup)" .name) -}}
{{- end -}}
{{- if not (hasKey .context "beamGeneratedSecrets") -}}
{{- $_ := set .context "beamGeneratedSecrets" (dict) -}}
{{- end -}}
{{- $cache := index .context "beamGeneratedSecrets" -}}
{{- $id := printf "%s/%s" .name .key -}}
{{- if not (hasKey $cache $id) -}}
{{- $existing := lookup "v1" "Secret" .context.Release.Namespace .name -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- $_ := set $cache $id (index $existing.data .key) -}}
{{- else -}}
{{- $_ := set $cache $id (randAlphaNum (int .length) | b64enc) -}}
{{- end -}}
{{- end -}}
{{- index $cache $id -}}
{{- end -}}

{{/*
checksum/secrets of a pod: the SHA-256 of the generated Secret values it reads, and of
nothing else (no labels, no chart version, no Secret it does not mount), so an upgrade
that changes none of them keeps the pod template. Call with
(dict "context" $ "reads" (list "requestToken" "redis" "database")). A Secret the user
provides (existingSecret) is not the chart's to hash: roll the pods after rotating it
(docs/OPERATIONS.md).
*/}}
{{- define "beam.secretsChecksum" -}}
{{- $ctx := .context -}}
{{- $values := $ctx.Values -}}
{{- $parts := list -}}
{{- if and (has "requestToken" .reads) (not $values.secrets.existingSecret) -}}
{{- $name := printf "%s-request-token" (include "beam.fullname" $ctx) -}}
{{- $parts = append $parts (printf "%s/request-token-secret=%s" $name (include "beam.secretValue" (dict "context" $ctx "name" $name "key" "request-token-secret" "length" 64))) -}}
{{- end -}}
{{- if and (has "redis" .reads) $values.redis.enabled (not $values.redis.auth.existingSecret) -}}
{{- $name := printf "%s-redis-auth" (include "beam.fullname" $ctx) -}}
{{- $parts = append $parts (printf "%s/redis-password=%s" $name (include "beam.secretValue" (dict "context" $ctx "name" $name "key" "redis-password" "length" 48))) -}}
{{- end -}}
{{- if and (has "database" .reads) $values.timescaledb.enabled (not $values.timescaledb.auth.existingSecret) -}}
{{- $name := printf "%s-timescaledb-auth" (include "beam.fullname" $ctx) -}}
{{- $parts = append $parts (printf "%s/password=%s" $name (include "beam.secretValue" (dict "context" $ctx "name" $name "key" "password" "length" 48))) -}}
{{- end -}}
{{- join "\n" $parts | sha256sum -}}
{{- end -}}

{{/* Annotations on generated Secrets: keep them on uninstall so data volumes stay usable. */}}
{{- define "beam.secretAnnotations" -}}
{{- if .Values.secrets.keepOnUninstall }}
helm.sh/resource-policy: keep
{{- end }}
{{- include "beam.commonAnnotations" . }}
{{- end -}}

{{/* ---------------------------------------------------------------- request token */}}

{{- define "beam.requestToken.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-request-token" (include "beam.fullname" .)) -}}
{{- end -}}

{{- define "beam.requestToken.secretKey" -}}
{{- if .Values.secrets.existingSecret -}}
{{- .Values.secrets.existingSecretRequestTokenKey -}}
{{- else -}}
request-token-secret
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- Redis */}}

{{- define "beam.redis.fullname" -}}
{{- printf "%s-redis" (include "beam.fullname" .) -}}
{{- end -}}

{{- define "beam.redis.headlessName" -}}
{{- printf "%s-redis-headless" (include "beam.fullname" .) -}}
{{- end -}}

{{- define "beam.sentinel.fullname" -}}
{{- printf "%s-redis-sentinel" (include "beam.fullname" .) -}}
{{- end -}}

{{- define "beam.sentinel.headlessName" -}}
{{- printf "%s-redis-sentinel-headless" (include "beam.fullname" .) -}}
{{- end -}}

{{/* Bundled Redis runs Sentinel when its architecture is "replication". */}}
{{- define "beam.redis.sentinelEnabled" -}}
{{- if and .Values.redis.enabled (eq .Values.redis.architecture "replication") -}}true{{- end -}}
{{- end -}}

{{/* Suffix of in-cluster DNS names: <ns>.svc.<clusterDomain>. */}}
{{- define "beam.dnsSuffix" -}}
{{- printf "%s.svc.%s" .Release.Namespace .Values.clusterDomain -}}
{{- end -}}

{{/* "host:port,host:port" of the bundled sentinels, one address per pod. */}}
{{- define "beam.sentinel.addresses" -}}
{{- $name := include "beam.sentinel.fullname" . -}}
{{- $headless := include "beam.sentinel.headlessName" . -}}
{{- $suffix := include "beam.dnsSuffix" . -}}
{{- $port := int .Values.redis.sentinel.service.ports.sentinel -}}
{{- $addresses := list -}}
{{- range $i := until (int .Values.redis.sentinel.replicaCount) -}}
{{- $addresses = append $addresses (printf "%s-%d.%s.%s:%d" $name $i $headless $suffix $port) -}}
{{- end -}}
{{- join "," $addresses -}}
{{- end -}}

{{/* Secret holding the Redis password ("" when external Redis has no password). */}}
{{- define "beam.redis.secretName" -}}
{{- if .Values.redis.enabled -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis-auth" (include "beam.fullname" .)) -}}
{{- else -}}
{{- .Values.externalRedis.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "beam.redis.secretKey" -}}
{{- if .Values.redis.enabled -}}
{{- if .Values.redis.auth.existingSecret -}}
{{- .Values.redis.auth.existingSecretPasswordKey -}}
{{- else -}}
redis-password
{{- end -}}
{{- else -}}
{{- .Values.externalRedis.existingSecretPasswordKey -}}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- database */}}

{{- define "beam.timescaledb.fullname" -}}
{{- printf "%s-timescaledb" (include "beam.fullname" .) -}}
{{- end -}}

{{- define "beam.database.host" -}}
{{- if .Values.timescaledb.enabled -}}
{{- printf "%s.%s" (include "beam.timescaledb.fullname" .) (include "beam.dnsSuffix" .) -}}
{{- else -}}
{{- .Values.externalDatabase.host -}}
{{- end -}}
{{- end -}}

{{- define "beam.database.port" -}}
{{- if .Values.timescaledb.enabled -}}
{{- .Values.timescaledb.service.ports.postgresql -}}
{{- else -}}
{{- .Values.externalDatabase.port -}}
{{- end -}}
{{- end -}}

{{- define "beam.database.name" -}}
{{- ternary .Values.timescaledb.auth.database .Values.externalDatabase.database .Values.timescaledb.enabled -}}
{{- end -}}

{{- define "beam.database.user" -}}
{{- ternary .Values.timescaledb.auth.username .Values.externalDatabase.user .Values.timescaledb.enabled -}}
{{- end -}}

{{/* The bundled database is reached inside the cluster network without TLS. */}}
{{- define "beam.database.sslmode" -}}
{{- ternary "disable" .Values.externalDatabase.sslmode .Values.timescaledb.enabled -}}
{{- end -}}

{{- define "beam.database.secretName" -}}
{{- if .Values.timescaledb.enabled -}}
{{- .Values.timescaledb.auth.existingSecret | default (printf "%s-timescaledb-auth" (include "beam.fullname" .)) -}}
{{- else -}}
{{- .Values.externalDatabase.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "beam.database.secretKey" -}}
{{- if .Values.timescaledb.enabled -}}
{{- if .Values.timescaledb.auth.existingSecret -}}
{{- .Values.timescaledb.auth.existingSecretPasswordKey -}}
{{- else -}}
password
{{- end -}}
{{- else -}}
{{- .Values.externalDatabase.existingSecretPasswordKey -}}
{{- end -}}
{{- end -}}

{{/*
Environment of every Beam container: where the stores are and their credentials (the
request-token key is the service's alone: beam.env.requestToken). Call with
(dict "context" $ "component" "service"|"operator"|"migrations"|"integrity"); the component picks its
database pool size, and only the service goes through PgBouncer (pgbouncer.enabled), with
LISTEN kept on a direct connection (BEAM_DATABASE_LISTEN_URL): the operator and migrations
need sessions (advisory locks). BEAM_DATABASE_URL names neither user nor password: asyncpg
takes them from PGUSER and PGPASSWORD (the libpq variables), so the password only travels
in a Secret and may hold any character (inside a URL, "@", "/", "?" or "%" would break it).
*/}}
{{- define "beam.env.stores" -}}
{{- $ctx := .context -}}
{{- $values := $ctx.Values -}}
- name: BEAM_ENVIRONMENT
  value: {{ $values.config.environment | quote }}
{{- if $values.redis.enabled }}
{{- if include "beam.redis.sentinelEnabled" $ctx }}
- name: BEAM_REDIS_MODE
  value: sentinel
- name: BEAM_REDIS_SENTINELS
  value: {{ include "beam.sentinel.addresses" $ctx | quote }}
- name: BEAM_REDIS_SENTINEL_MASTER
  value: {{ $values.redis.sentinel.masterSet | quote }}
{{- else }}
- name: BEAM_REDIS_MODE
  value: standalone
- name: BEAM_REDIS_URL
  value: {{ printf "redis://%s.%s:%d/0" (include "beam.redis.fullname" $ctx) (include "beam.dnsSuffix" $ctx) (int $values.redis.service.ports.redis) | quote }}
{{- end }}
{{- else }}
- name: BEAM_REDIS_MODE
  value: {{ $values.externalRedis.mode | quote }}
{{- if eq $values.externalRedis.mode "sentinel" }}
- name: BEAM_REDIS_SENTINELS
  value: {{ join "," $values.externalRedis.sentinels | quote }}
- name: BEAM_REDIS_SENTINEL_MASTER
  value: {{ $values.externalRedis.sentinelMaster | quote }}
{{- else }}
- name: BEAM_REDIS_URL
  value: {{ $values.externalRedis.url | quote }}
{{- end }}
{{- end }}
{{- $redisSecret := include "beam.redis.secretName" $ctx }}
{{- if $redisSecret }}
- name: BEAM_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $redisSecret }}
      key: {{ include "beam.redis.secretKey" $ctx }}
{{- end }}
- name: PGUSER
  value: {{ include "beam.database.user" $ctx | quote }}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "beam.database.secretName" $ctx }}
      key: {{ include "beam.database.secretKey" $ctx }}
{{- $direct := printf "postgresql://%s:%v/%s?sslmode=%s" (include "beam.database.host" $ctx) (include "beam.database.port" $ctx) (include "beam.database.name" $ctx) (include "beam.database.sslmode" $ctx) }}
{{- if and (eq .component "service") $values.pgbouncer.enabled }}
- name: BEAM_DATABASE_URL
  value: {{ printf "postgresql://%s.%s:%d/%s?sslmode=disable" (include "beam.pgbouncer.fullname" $ctx) (include "beam.dnsSuffix" $ctx) (int $values.pgbouncer.service.ports.pgbouncer) (include "beam.database.name" $ctx) | quote }}
- name: BEAM_DATABASE_LISTEN_URL
  value: {{ $direct | quote }}
{{- if eq (int $values.pgbouncer.maxPreparedStatements) 0 }}
{{- /* PgBouncer does not track prepared statements: asyncpg must not cache named ones. */}}
- name: BEAM_DATABASE_STATEMENT_CACHE_SIZE
  value: "0"
{{- end }}
{{- else }}
- name: BEAM_DATABASE_URL
  value: {{ $direct | quote }}
{{- end }}
{{- /* Jobs (migrations, integrity check): a pool of 2 and a read pool of 1. */}}
{{- $pool := dict "poolMin" 1 "poolMax" 2 "readPoolMax" 1 }}
{{- if eq .component "service" }}{{ $pool = $values.service.database }}{{ end }}
{{- if eq .component "operator" }}{{ $pool = $values.operator.database }}{{ end }}
- name: BEAM_DATABASE_POOL_MIN
  value: {{ $pool.poolMin | quote }}
- name: BEAM_DATABASE_POOL_MAX
  value: {{ $pool.poolMax | quote }}
- name: BEAM_DATABASE_READ_POOL_MAX
  value: {{ $pool.readPoolMax | quote }}
{{- end -}}

{{/*
The request-token key, for the service's pods only: it signs and verifies the tokens of
CheckBalance, DeductTokens and FinalizeRequest. The operator, the migration Job and the
integrity CronJob never see it (they read no such setting).
*/}}
{{- define "beam.env.requestToken" -}}
- name: BEAM_REQUEST_TOKEN_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "beam.requestToken.secretName" . }}
      key: {{ include "beam.requestToken.secretKey" . }}
{{- end -}}

{{/* ---------------------------------------------------------------- PgBouncer */}}

{{- define "beam.pgbouncer.fullname" -}}
{{- printf "%s-pgbouncer" (include "beam.fullname" .) -}}
{{- end -}}

{{/* pgbouncer.ini (its checksum rolls the PgBouncer pods when it changes). */}}
{{- define "beam.pgbouncer.ini" -}}
{{- $values := .Values.pgbouncer -}}
[databases]
{{ include "beam.database.name" . }} = host={{ include "beam.database.host" . }} port={{ include "beam.database.port" . }} dbname={{ include "beam.database.name" . }}

[pgbouncer]
listen_addr = *
listen_port = {{ $values.containerPorts.pgbouncer }}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = /run/pgbouncer/userlist.txt
pidfile = /run/pgbouncer/pgbouncer.pid
pool_mode = {{ $values.poolMode }}
default_pool_size = {{ $values.defaultPoolSize }}
max_client_conn = {{ $values.maxClientConnections }}
max_db_connections = {{ $values.defaultPoolSize }}
{{- if gt (int $values.maxPreparedStatements) 0 }}
max_prepared_statements = {{ $values.maxPreparedStatements }}
{{- end }}
ignore_startup_parameters = extra_float_digits
client_tls_sslmode = disable
server_tls_sslmode = {{ include "beam.database.sslmode" . }}
server_check_query = SELECT 1
{{- with $values.extraConfig }}
{{ . }}
{{- end }}
{{- end -}}

{{/*
The database connection budget, as YAML (Helm templates return strings; read it with fromYaml):
service, pgbouncer, operator, migrations, reserved, total and max ("0" = unknown). Every
process's pools (the money paths' poolMax and the read-only calls' readPoolMax) are counted at
their maximum, service pods at the autoscaler's maximum plus the rollout surge, and each
service process (service.workers) has its own pools. Behind PgBouncer
the service holds one direct connection per process (LISTEN) and PgBouncer
defaultPoolSize per PgBouncer pod.
*/}}
{{- define "beam.connectionBudget.values" -}}
{{- $v := .Values -}}
{{- $pods := ternary $v.service.autoscaling.maxReplicas $v.service.replicaCount $v.service.autoscaling.enabled | int -}}
{{- $surge := 0 -}}
{{- if eq $v.service.updateStrategy.type "RollingUpdate" -}}
{{- $maxSurge := toString (dig "rollingUpdate" "maxSurge" 1 $v.service.updateStrategy) -}}
{{- if hasSuffix "%" $maxSurge -}}
{{- $surge = div (add (mul $pods (int (trimSuffix "%" $maxSurge))) 99) 100 | int -}}
{{- else -}}
{{- $surge = int $maxSurge -}}
{{- end -}}
{{- end -}}
{{- $processes := mul (add $pods $surge) (int (dig "workers" 1 $v.service)) -}}
{{- $perProcess := add (int $v.service.database.poolMax) (int $v.service.database.readPoolMax) -}}
{{- $service := mul $processes $perProcess -}}
{{- $pgbouncer := 0 -}}
{{- if $v.pgbouncer.enabled -}}
{{- $service = $processes -}}
{{- $pgbouncer = mul (add (int $v.pgbouncer.replicaCount) 1) (int $v.pgbouncer.defaultPoolSize) -}}
{{- end -}}
{{- $operator := ternary (add (int $v.operator.database.poolMax) (int $v.operator.database.readPoolMax)) 0 $v.operator.enabled -}}
{{- $jobs := add (ternary 3 0 (and $v.migrations.enabled (not $v.gitops.enabled))) (ternary 3 0 $v.integrityCheck.enabled) -}}
{{- $reserved := int $v.connectionBudget.reserved -}}
{{- $max := ternary (int $v.timescaledb.maxConnections) (int $v.externalDatabase.maxConnections) $v.timescaledb.enabled -}}
service: {{ $service }}
serviceProcesses: {{ $processes }}
serviceClients: {{ mul $processes $perProcess }}
pgbouncer: {{ $pgbouncer }}
operator: {{ $operator }}
jobs: {{ $jobs }}
reserved: {{ $reserved }}
total: {{ add $service $pgbouncer $operator $jobs $reserved }}
max: {{ $max }}
{{- end -}}

{{/*
Refuse value combinations that would install but never work. Rendered once, from
NOTES.txt and from every workload, so `helm template` fails as early as `helm install`.
*/}}
{{- define "beam.validateValues" -}}
{{- if .Values.gitops.enabled -}}
{{- $missing := list -}}
{{- if not .Values.secrets.existingSecret -}}{{- $missing = append $missing "secrets.existingSecret" -}}{{- end -}}
{{- if and .Values.redis.enabled (not .Values.redis.auth.existingSecret) -}}{{- $missing = append $missing "redis.auth.existingSecret" -}}{{- end -}}
{{- if and .Values.timescaledb.enabled (not .Values.timescaledb.auth.existingSecret) -}}{{- $missing = append $missing "timescaledb.auth.existingSecret" -}}{{- end -}}
{{- if $missing -}}
{{- fail (printf "gitops.enabled=true: a GitOps render cannot look up or keep generated Secrets, so every Secret must already exist (e.g. from External Secrets). Set %s" (join ", " $missing)) -}}
{{- end -}}
{{- end -}}
{{- if not .Values.redis.enabled -}}
{{- if and (eq .Values.externalRedis.mode "sentinel") (empty .Values.externalRedis.sentinels) -}}
{{- fail "externalRedis.sentinels must list at least one host:port when externalRedis.mode=sentinel" -}}
{{- end -}}
{{- if and (ne .Values.externalRedis.mode "sentinel") (empty .Values.externalRedis.url) -}}
{{- fail "externalRedis.url is required when redis.enabled=false and externalRedis.mode is standalone or cluster" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.redis.enabled (eq .Values.redis.architecture "replication") -}}
{{- if ge (int .Values.redis.minReplicasToWrite) (int .Values.redis.replicaCount) -}}
{{- fail (printf "redis.minReplicasToWrite (%d) must be below redis.replicaCount (%d): the master could never accept a write" (int .Values.redis.minReplicasToWrite) (int .Values.redis.replicaCount)) -}}
{{- end -}}
{{- if gt (int .Values.redis.sentinel.quorum) (int .Values.redis.sentinel.replicaCount) -}}
{{- fail "redis.sentinel.quorum cannot exceed redis.sentinel.replicaCount" -}}
{{- end -}}
{{- end -}}
{{- $drain := add (int .Values.service.shutdown.delaySeconds) (int .Values.service.shutdown.graceSeconds) 5 -}}
{{- if gt (int $drain) (int .Values.service.terminationGracePeriodSeconds) -}}
{{- fail (printf "service.terminationGracePeriodSeconds (%d) must cover service.shutdown.delaySeconds (%d) + service.shutdown.graceSeconds (%d) + 5: the kubelet would kill pods in the middle of their drain" (int .Values.service.terminationGracePeriodSeconds) (int .Values.service.shutdown.delaySeconds) (int .Values.service.shutdown.graceSeconds)) -}}
{{- end -}}
{{- $budget := include "beam.connectionBudget.values" . | fromYaml -}}
{{- if and .Values.connectionBudget.check (gt (int $budget.max) 0) (gt (int $budget.total) (int $budget.max)) -}}
{{- fail (printf "database connection budget exceeded: %d connections > max_connections %d (%s). Service %d (%s), PgBouncer %d, operator %d, jobs %d (migrations, integrity check), reserved %d. Lower service.database.poolMax or readPoolMax, service.autoscaling.maxReplicas or service.workers, enable pgbouncer, or raise the database's max_connections" (int $budget.total) (int $budget.max) (ternary "timescaledb.maxConnections" "externalDatabase.maxConnections" .Values.timescaledb.enabled) (int $budget.service) (ternary "one direct LISTEN connection per process" (printf "%d processes x (service.database.poolMax %d + service.database.readPoolMax %d)" (int $budget.serviceProcesses) (int .Values.service.database.poolMax) (int .Values.service.database.readPoolMax)) .Values.pgbouncer.enabled) (int $budget.pgbouncer) (int $budget.operator) (int $budget.jobs) (int $budget.reserved)) -}}
{{- end -}}
{{- if .Values.pgbouncer.enabled -}}
{{- if gt (int $budget.serviceClients) (int .Values.pgbouncer.maxClientConnections) -}}
{{- fail (printf "pgbouncer.maxClientConnections (%d) is below what the service pools may open (%d = %d processes x (service.database.poolMax %d + service.database.readPoolMax %d))" (int .Values.pgbouncer.maxClientConnections) (int $budget.serviceClients) (int $budget.serviceProcesses) (int .Values.service.database.poolMax) (int .Values.service.database.readPoolMax)) -}}
{{- end -}}
{{- if eq (toString .Values.service.migrateOnStart) "true" -}}
{{- fail "service.migrateOnStart=true cannot go through PgBouncer (migrations hold a session-level advisory lock, which transaction pooling breaks): let the operator (operator.migrateOnStart) or the migration Job migrate" -}}
{{- end -}}
{{- if and (or .Values.gitops.enabled (not .Values.operator.enabled)) (not (and .Values.operator.enabled .Values.operator.migrateOnStart)) -}}
{{- fail "with pgbouncer.enabled the service does not migrate, so a first install needs the operator to (operator.enabled and operator.migrateOnStart)" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.timescaledb.enabled (eq .Values.timescaledb.auth.username "postgres") -}}
{{- fail "timescaledb.auth.username cannot be \"postgres\": that is the bundled database's superuser, and Beam connects as a non-superuser owner" -}}
{{- end -}}
{{- if not .Values.timescaledb.enabled -}}
{{- if empty .Values.externalDatabase.host -}}
{{- fail "externalDatabase.host is required when timescaledb.enabled=false" -}}
{{- end -}}
{{- if empty .Values.externalDatabase.existingSecret -}}
{{- fail "externalDatabase.existingSecret is required when timescaledb.enabled=false (the chart never takes a database password inline)" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
"true" when the service applies migrations at start-up (BEAM_MIGRATE_ON_START). "auto" turns it
on when nothing else would migrate a first install: under gitops.enabled (no hook Job) or
without the operator (the Job runs on upgrades only); never behind PgBouncer.
*/}}
{{- define "beam.service.migrateOnStart" -}}
{{- $value := toString .Values.service.migrateOnStart -}}
{{- if eq $value "auto" -}}
{{- ternary "true" "false" (and (or .Values.gitops.enabled (not .Values.operator.enabled)) (not .Values.pgbouncer.enabled)) -}}
{{- else -}}
{{- $value -}}
{{- end -}}
{{- end -}}

{{/* Rules the operator needs in every namespace it watches (see operator-rbac.yaml). */}}
{{- define "beam.operator.namespacedRules" -}}
- apiGroups: ["beam.dev"]
  resources: ["beamcustomers", "beamapikeys", "beampricelists"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["beam.dev"]
  resources: ["beamcustomers/status", "beamapikeys/status", "beampricelists/status"]
  verbs: ["get", "patch", "update"]
# Secrets by name only: the operator reads, creates, patches and deletes the Secret of each
# BeamApiKey; it never lists or watches them (RBAC cannot narrow create by name or owner).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

{{/* Key of the bootstrap superuser's password (bundled database; read at initdb only). */}}
{{- define "beam.database.superuserSecretKey" -}}
{{- if .Values.timescaledb.auth.existingSecret -}}
{{- .Values.timescaledb.auth.existingSecretSuperuserPasswordKey -}}
{{- else -}}
postgres-password
{{- end -}}
{{- end -}}

{{/*
An exec probe handler that PINGs Redis or Sentinel on localhost, giving up one second before
the probe's own timeout. Call with (dict "port" 6379 "probe" .Values.redis.livenessProbe "auth" true).
*/}}
{{- define "beam.redis.pingHandler" -}}
{{- $seconds := max 1 (sub (int .probe.timeoutSeconds) 1) -}}
{{- $auth := ternary "REDISCLI_AUTH=\"$REDIS_PASSWORD\" " "" .auth -}}
{{- $command := printf "[ \"$(%stimeout %d redis-cli -h 127.0.0.1 -p %d ping)\" = PONG ]" $auth (int $seconds) (int .port) -}}
{{- toYaml (dict "exec" (dict "command" (list "/bin/sh" "-c" $command))) -}}
{{- end -}}
