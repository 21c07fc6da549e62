"""kubetune.controller: the operator's reconcile loop and what it runs on (no Kopf decorators here; those are
in kubetune.operator_main).

- `loop`: the Controller: watch events fill the Store and queue FineTuneJobs; workers reconcile them.
- `reconcile`: one pass over one FineTuneJob (observe, derive, write status and Event, act).
- `serving`: the hand-off of a succeeded job's model to serving.
- `store`: the watch cache and the work queue.
- `kube`: the rate-limited Kubernetes client and the Event recorder.
- `leader`: Lease-based leader election.
- `metrics`: Prometheus metrics.
- `settings`: the operator's settings (KUBETUNE_*).
"""
