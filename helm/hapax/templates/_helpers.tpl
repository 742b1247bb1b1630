{{/* Names, labels and the connection settings every template shares. */}}

{{- define "hapax.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hapax.fullname" -}}
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

{{- define "hapax.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "hapax.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hapax
{{- end -}}

{{/* Selector labels of one component: gateway, etcd, redis, config-push. */}}
{{- define "hapax.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hapax.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "hapax.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "hapax.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "hapax.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "hapax.adminSecretName" -}}
{{- default (printf "%s-admin" (include "hapax.fullname" .)) .Values.adminKey.existingSecret -}}
{{- end -}}

{{/* HAPAX_ETCD_ENDPOINTS: the bundled StatefulSet's members, or the external endpoints. */}}
{{- define "hapax.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $full := include "hapax.fullname" . -}}
{{- $eps := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $eps = append $eps (printf "http://%s-etcd-%d.%s-etcd-headless.%s.svc:2379" $full $i $full $.Release.Namespace) -}}
{{- end -}}
{{- join "," $eps -}}
{{- else -}}
{{- required "etcd.external.endpoints is required when etcd.enabled is false" (join "," .Values.etcd.external.endpoints) -}}
{{- end -}}
{{- end -}}

{{/* HAPAX_REDIS_URL: the bundled Redis, or the external URL. */}}
{{- define "hapax.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis.%s.svc:6379/0" (include "hapax.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- required "redis.external.url is required when redis.enabled is false" .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{/* The bootstrap config: the user's config with what the chart owns set over it. */}}
{{- define "hapax.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $server := mustMergeOverwrite (deepCopy (default dict $cfg.server)) (dict "host" "0.0.0.0" "port" (int .Values.server.port) "drain_delay" .Values.server.drainDelay "shutdown_grace" .Values.server.shutdownGrace) -}}
{{- if .Values.http3.enabled -}}
{{- $_ := set $server "http3" (mustMergeOverwrite (deepCopy (default dict $server.http3)) (dict "enabled" true "port" (int .Values.server.port) "certificate_file" "/etc/hapax/tls/tls.crt" "key_file" "/etc/hapax/tls/tls.key")) -}}
{{- end -}}
{{- $_ := set $cfg "server" $server -}}
{{- $state := deepCopy (default dict $cfg.state) -}}
{{- $redis := deepCopy (default dict $state.redis) -}}
{{- if and (not .Values.redis.enabled) .Values.redis.external.existingSecret -}}
{{- $_ := set $redis "password" "${HAPAX_REDIS_PASSWORD}" -}}
{{- end -}}
{{- if and (not .Values.redis.enabled) .Values.redis.external.tls.caSecret -}}
{{- $_ := set $redis "tls_ca_file" "/etc/hapax/redis-tls/ca.crt" -}}
{{- end -}}
{{- if $redis -}}
{{- $_ := set $state "redis" $redis -}}
{{- $_ := set $cfg "state" $state -}}
{{- end -}}
{{- if not .Values.etcd.enabled -}}
{{- $x := .Values.etcd.external -}}
{{- $etcd := dict -}}
{{- if $x.username -}}{{- $_ := set $etcd "username" $x.username -}}{{- end -}}
{{- if $x.existingSecret -}}{{- $_ := set $etcd "password" "${HAPAX_ETCD_PASSWORD}" -}}{{- end -}}
{{- if $x.tls.enabled -}}
{{- $_ := set $etcd "ca_file" "/etc/hapax/etcd-tls/ca.crt" -}}
{{- if $x.tls.clientCert -}}
{{- $_ := set $etcd "cert_file" "/etc/hapax/etcd-tls/tls.crt" -}}
{{- $_ := set $etcd "key_file" "/etc/hapax/etcd-tls/tls.key" -}}
{{- end -}}
{{- end -}}
{{- if $etcd -}}
{{- $cluster := deepCopy (default dict $cfg.cluster) -}}
{{- $_ := set $cluster "etcd" (mustMergeOverwrite (deepCopy (default dict $cluster.etcd)) $etcd) -}}
{{- $_ := set $cfg "cluster" $cluster -}}
{{- end -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Environment shared by the nodes and the config-push Job. */}}
{{- define "hapax.env" -}}
- name: HAPAX_CLUSTER
  value: {{ .Values.clusterName | quote }}
- name: HAPAX_ETCD_ENDPOINTS
  value: {{ include "hapax.etcdEndpoints" . | quote }}
- name: HAPAX_REDIS_URL
  value: {{ include "hapax.redisUrl" . | quote }}
- name: HAPAX_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "hapax.adminSecretName" . }}
      key: {{ .Values.adminKey.secretKey }}
{{- if and (not .Values.redis.enabled) .Values.redis.external.existingSecret }}
- name: HAPAX_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.passwordKey }}
{{- end }}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.existingSecret }}
- name: HAPAX_ETCD_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.etcd.external.existingSecret }}
      key: {{ .Values.etcd.external.passwordKey }}
{{- end }}
{{- range .Values.providerSecrets }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .secretKey }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes (and their mounts) shared by the nodes and the config-push Job. */}}
{{- define "hapax.volumes" -}}
- name: config
  configMap:
    name: {{ include "hapax.fullname" . }}-config
- name: tmp
  emptyDir: {}
{{- if .Values.http3.enabled }}
- name: tls
  secret:
    secretName: {{ required "http3.tlsSecret is required when http3.enabled" .Values.http3.tlsSecret }}
{{- end }}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.tls.enabled }}
- name: etcd-tls
  secret:
    secretName: {{ required "etcd.external.tls.secretName is required when etcd TLS is on" .Values.etcd.external.tls.secretName }}
{{- end }}
{{- if and (not .Values.redis.enabled) .Values.redis.external.tls.caSecret }}
- name: redis-tls
  secret:
    secretName: {{ .Values.redis.external.tls.caSecret }}
{{- end }}
{{- end -}}

{{- define "hapax.volumeMounts" -}}
- name: config
  mountPath: /etc/hapax/hapax.yaml
  subPath: hapax.yaml
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.http3.enabled }}
- name: tls
  mountPath: /etc/hapax/tls
  readOnly: true
{{- end }}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.tls.enabled }}
- name: etcd-tls
  mountPath: /etc/hapax/etcd-tls
  readOnly: true
{{- end }}
{{- if and (not .Values.redis.enabled) .Values.redis.external.tls.caSecret }}
- name: redis-tls
  mountPath: /etc/hapax/redis-tls
  readOnly: true
{{- end }}
{{- end -}}
