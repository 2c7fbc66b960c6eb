{{/*
The chart name, or nameOverride.
*/}}
{{- define "metalkube.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every resource name: fullnameOverride, else "<release>-<name>", or the release name
alone when it already contains the name (so `helm install metalkube .` gives "metalkube", not
"metalkube-metalkube"). Truncated to leave room for suffixes such as "-client-tls" within 63.
*/}}
{{- define "metalkube.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := include "metalkube.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"name-version" for the helm.sh/chart label.
*/}}
{{- define "metalkube.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels of the controller pods. app.kubernetes.io/name is the fixed application name
"metalkube-controller" rather than the chart name: the controller ServiceMonitor uses this label
as its jobLabel, and the alerts and dashboard query job="metalkube-controller" whatever the
release is called.
*/}}
{{- define "metalkube.selectorLabels" -}}
app.kubernetes.io/name: metalkube-controller
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels every resource the chart renders carries, whichever component it belongs to.
*/}}
{{- define "metalkube.commonLabels" -}}
helm.sh/chart: {{ include "metalkube.chart" . }}
app.kubernetes.io/version: {{ (.Values.controller.image.tag | default .Chart.AppVersion) | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: metalkube
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels on every resource of the controller (and the chart's shared objects).
*/}}
{{- define "metalkube.labels" -}}
{{ include "metalkube.selectorLabels" . }}
{{ include "metalkube.commonLabels" . }}
{{- end }}

{{/*
Selector labels of the router pods: their own application name, so no selector of the
controller's (its metrics Service, PodDisruptionBudget, ServiceMonitor) ever matches a router pod,
and the router ServiceMonitor's jobLabel gives job="metalkube-router" whatever the release name.
*/}}
{{- define "metalkube.routerSelectorLabels" -}}
app.kubernetes.io/name: metalkube-router
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels on every resource of the router.
*/}}
{{- define "metalkube.routerLabels" -}}
{{ include "metalkube.routerSelectorLabels" . }}
{{ include "metalkube.commonLabels" . }}
app.kubernetes.io/component: router
{{- end }}

{{/*
Prefix of the router's resource names.
*/}}
{{- define "metalkube.routerFullname" -}}
{{- printf "%s-router" (include "metalkube.fullname" .) }}
{{- end }}

{{/*
The router's ServiceAccount name.
*/}}
{{- define "metalkube.routerServiceAccountName" -}}
{{- if .Values.router.serviceAccount.create }}
{{- default (include "metalkube.routerFullname" .) .Values.router.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.router.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The router image reference; the tag defaults to the chart's appVersion.
*/}}
{{- define "metalkube.routerImage" -}}
{{- printf "%s:%s" .Values.router.image.repository (.Values.router.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
Name of the Secret holding the router's client TLS material (ca.crt, tls.crt, tls.key), or empty
when agents are driven without TLS. It comes from the same source as the controller's: the chart's
CA and cert-manager issue the router a certificate of its own (never the controller's, which may
drive the agents' gRPC API); with tls.existingSecret, router.tls.existingSecret must name one.
*/}}
{{- define "metalkube.routerTlsSecretName" -}}
{{- $source := include "metalkube.tlsSource" . }}
{{- if eq $source "existing" }}
{{- required "metalkube: tls.existingSecret brings the controller's client certificate; the router needs its own from the same CA: set router.tls.existingSecret (a Secret with ca.crt, tls.crt, tls.key), or router.enabled=false" .Values.router.tls.existingSecret }}
{{- else if or (eq $source "certManager") (eq $source "generated") }}
{{- printf "%s-tls" (include "metalkube.routerFullname" .) }}
{{- end }}
{{- end }}

{{/*
The controller's ServiceAccount name.
*/}}
{{- define "metalkube.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "metalkube.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The controller image reference; the tag defaults to the chart's appVersion.
*/}}
{{- define "metalkube.image" -}}
{{- printf "%s:%s" .Values.controller.image.repository (.Values.controller.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
Where the controller's client TLS material comes from: "insecure" (none), "existing"
(tls.existingSecret), "certManager", or "generated" (the chart's own CA, the default). Fails
rendering on a contradiction, or when the generated CA is turned off and nothing replaces it, so
a wrong setting is caught at install time rather than as a crash-looping pod.
*/}}
{{- define "metalkube.tlsSource" -}}
{{- if and .Values.controller.insecure (or .Values.tls.existingSecret .Values.certManager.enabled) }}
{{- fail "metalkube: controller.insecure=true turns client TLS off; unset tls.existingSecret and certManager.enabled, or set controller.insecure=false" }}
{{- else if and .Values.tls.existingSecret .Values.certManager.enabled }}
{{- fail "metalkube: set either tls.existingSecret or certManager.enabled, not both" }}
{{- else if .Values.controller.insecure }}insecure
{{- else if .Values.tls.existingSecret }}existing
{{- else if .Values.certManager.enabled }}certManager
{{- else if .Values.tls.generated.enabled }}generated
{{- else }}
{{- fail "metalkube: the controller needs a client certificate for the agents' mTLS. Choose one: tls.generated.enabled=true (the chart makes a metalkube CA), tls.existingSecret=<Secret with ca.crt, tls.crt, tls.key>, certManager.enabled=true (cert-manager issues it), or controller.insecure=true (plaintext gRPC, local development only)" }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding the controller's client TLS material (ca.crt, tls.crt, tls.key), or
empty when the controller runs with --insecure.
*/}}
{{- define "metalkube.tlsSecretName" -}}
{{- $source := include "metalkube.tlsSource" . }}
{{- if eq $source "existing" }}
{{- .Values.tls.existingSecret }}
{{- else if or (eq $source "certManager") (eq $source "generated") }}
{{- printf "%s-client-tls" (include "metalkube.fullname" .) }}
{{- end }}
{{- end }}

{{/*
The issuer that signs the controller's client certificate: the given certManager.issuerRef, or
the CA Issuer the chart generates.
*/}}
{{- define "metalkube.clientIssuerRef" -}}
{{- if .Values.certManager.issuerRef }}
name: {{ required "certManager.issuerRef.name is required when issuerRef is set" .Values.certManager.issuerRef.name }}
kind: {{ .Values.certManager.issuerRef.kind | default "Issuer" }}
group: {{ .Values.certManager.issuerRef.group | default "cert-manager.io" }}
{{- else }}
name: {{ include "metalkube.fullname" . }}-ca
kind: Issuer
group: cert-manager.io
{{- end }}
{{- end }}
