{{- define "kubetune.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.labels" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Leader-election timings client-go would refuse, refused when the chart renders rather than at run time. */}}
{{- define "kubetune.checkLeaderElection" -}}
{{- $le := .Values.leaderElection }}
{{- if $le.enabled }}
{{- if not (lt (float64 $le.renewDeadline) (float64 $le.leaseDuration)) }}
{{- fail (printf "leaderElection.renewDeadline (%v) must be below leaderElection.leaseDuration (%v): a leader must give up before a standby may take over" $le.renewDeadline $le.leaseDuration) }}
{{- end }}
{{- if not (lt (mulf $le.retryPeriod 1.2) (float64 $le.renewDeadline)) }}
{{- fail (printf "leaderElection.retryPeriod (%v) must be below leaderElection.renewDeadline / 1.2 (%.3g s): the leader retries a renewal before its deadline" $le.retryPeriod (divf $le.renewDeadline 1.2)) }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "kubetune.serviceAccountName" -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* Rules in each watched namespace: exactly the calls the operator makes (kubetune/controller/kube.py + Kopf). */}}
{{- define "kubetune.namespacedRules" -}}
# FineTuneJobs: Kopf lists/watches them (no annotations, no finalizer); TTL clean-up deletes them.
- apiGroups: [kubetune.io]
  resources: [finetunejobs]
  verbs: [list, watch, delete]
- apiGroups: [kubetune.io]
  resources: [finetunejobs/status]
  verbs: [patch]
# The workload: created, watched (reconcile is driven by its changes), suspended/resumed, deleted when the job
# stops (or when a Job that has failed cannot run a restarted gang).
- apiGroups: [batch]
  resources: [jobs]
  verbs: [create, list, watch, patch, delete]
# ConfigMap and headless Service: created once, deleted by owner references; a new run (an edit after
# the job finished) replaces the ConfigMap's trainer config.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create, patch]
- apiGroups: [""]
  resources: [services]
  verbs: [create]
# Pods: watched for status, exit codes and rank 0's IP; a gang restart deletes the failed generation's pods (the
# Job controller replaces them), and each new generation is released: its gang scheduling gate lifted and its
# generation label set (patch).
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, patch, delete]
# A pod lost with its node is marked Failed (as the pod garbage collector does for a node that is gone), so that
# the Job controller replaces it in a gang restart.
- apiGroups: [""]
  resources: [pods/status]
  verbs: [patch]
# Events on FineTuneJobs (the operator posts core/v1 Events).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# spec.serving: once a job succeeds, its KServe InferenceService or Deployment is created (then owned);
# a later run of the job re-points its own one at the new model (get, then update).
- apiGroups: [serving.kserve.io]
  resources: [inferenceservices]
  verbs: [create, get, update]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [create, get, update]
# spec.scheduling.gang: the gang scheduler's PodGroup, created before the Job (owned: it goes with the job).
- apiGroups: [scheduling.x-k8s.io, scheduling.volcano.sh, scheduling.run.ai]
  resources: [podgroups]
  verbs: [create]
# Kueue: its Workloads say why a queued job waits and when it is admitted (read only).
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [list, watch]
{{- end -}}

{{/* Cluster-scoped rules Kopf needs in any mode: it discovers resources by watching CRDs. */}}
{{- define "kubetune.clusterRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end -}}
