{{- /*
The name of the operator's Kopf peering object: a ClusterKopfPeering, or the KopfPeering in
each watched namespace. Per release and release namespace, so two releases never pause each
other, and never "default", which other Kopf operators in the cluster may use.
*/}}
{{- define "beam.operator.peeringName" -}}
{{- printf "%s-%s-operator" (include "beam.fullname" .) .Release.Namespace | trunc 253 | trimSuffix "-" -}}
{{- end }}

{{- /* RBAC for Kopf's peering: watch the kind, read and patch only the release's object. */}}
{{- define "beam.operator.peeringRules" -}}
- apiGroups: ["kopf.dev"]
  resources: [{{ .resource | quote }}]
  verbs: ["list", "watch"]
- apiGroups: ["kopf.dev"]
  resources: [{{ .resource | quote }}]
  resourceNames: [{{ include "beam.operator.peeringName" .context | quote }}]
  verbs: ["get", "patch"]
{{- end }}
