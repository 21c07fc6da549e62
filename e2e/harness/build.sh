#!/usr/bin/env bash
# Build the e2e binaries from their Go modules, pinned in versions.env, and cache
# them outside the repo in ${KUBETUNE_E2E_CACHE:-$HOME/.cache/kubetune-e2e}/<name>-<version>/bin.
# Idempotent: a component whose binaries are already cached is skipped.
#
#   kube-apiserver, kube-controller-manager  k8s.io/kubernetes (wrapper module, staging replaced)
#   etcd                                      go.etcd.io/etcd/server/v3 (wrapper module)
#   minio                                     github.com/minio/minio (S3 server)
#   helm                                      helm.sh/helm/v3/cmd/helm (wrapper module)
#   node: kubelet, kube-scheduler, pause      k8s.io/kubernetes (same wrapper module; own cache dir,
#                                             so adding it does not invalidate the control plane's)
#   coredns                                   github.com/coredns/coredns (custom main, only the plugins used)
#   kserve                                    github.com/kserve/kserve: not built, only its CRDs (config/crd/full)
#                                             taken from the module zip, for the spec.serving tests
#   registry                                  github.com/distribution/distribution/v3 (OCI registry; custom main:
#                                             filesystem storage + htpasswd auth only, no cloud SDKs)
#   coscheduling                              sigs.k8s.io/scheduler-plugins (kube-scheduler with only the Coscheduling
#                                             plugin: custom main; k8s staging pinned to KUBERNETES_VERSION's tags)
#                                             plus its PodGroup CRD (config/crd/bases) from the module zip
#   kueue                                     sigs.k8s.io/kueue/cmd/kueue (the manager: controllers + webhooks),
#                                             plus its CRDs, ClusterRole and webhook configurations from the module zip
#
# `node` and `coredns` are only needed by the real-kubelet mode (the default; not by KUBETUNE_E2E_NODE=agent).
#
# Versions are chosen so that every module they need is on the Go module proxy
# (e.g. k8s v1.32.13's staging modules are not all there; v1.32.2's are).
# k8s.io/kubernetes and etcd's server module carry `replace` directives pointing at
# sibling directories, so `go install pkg@version` refuses them; a throwaway wrapper
# module requiring them (and pinning what the replaces pointed at) builds them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache="${KUBETUNE_E2E_CACHE:-$HOME/.cache/kubetune-e2e}"
mkdir -p "$cache"
export GOFLAGS="${GOFLAGS:-} -trimpath -buildvcs=false -mod=mod"
export GOTOOLCHAIN=local CGO_ENABLED=0
ldflags="-s -w"

have() { for b in "$@"; do [[ -x $b ]] || return 1; done; }

wrapper() { # wrapper <dir> <go.mod body>: fresh throwaway module in <dir>
  rm -rf "$1"; mkdir -p "$1"
  printf 'module kubetune.local/e2e-build\n\ngo 1.24\n\n%s\n' "$2" >"$1/go.mod"
}

k8s_wrapper() { # k8s_wrapper <dir> <version>: wrapper module requiring k8s.io/kubernetes + its staging tags
  local v=$2 sv="v0${2#v1}" rep="" m gomod
  # every staging module the kubernetes go.mod replaces with ./staging/... -> its v0.x tag
  gomod=$(cd "$cache" && go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  for m in $(awk '/=> \.\/staging/{print $1}' "$gomod"); do
    rep+="replace $m => $m $sv"$'\n'
  done
  wrapper "$1" "require k8s.io/kubernetes $v
$rep"
}

build_kubernetes() {
  local v=$KUBERNETES_VERSION out="$cache/kubernetes-$KUBERNETES_VERSION/bin"
  have "$out/kube-apiserver" "$out/kube-controller-manager" && { echo "kubernetes $v: cached"; return; }
  local w="$cache/kubernetes-$v/src"
  k8s_wrapper "$w" "$v"
  local ver="k8s.io/component-base/version" minor="${v#v1.}"; minor="${minor%%.*}"
  local lf="$ldflags -X $ver.gitVersion=$v -X $ver.gitMajor=1 -X $ver.gitMinor=$minor -X $ver.gitTreeState=clean"
  lf+=" -X k8s.io/client-go/pkg/version.gitVersion=$v -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  (cd "$w" && go get "k8s.io/kubernetes/cmd/kube-apiserver@$v" "k8s.io/kubernetes/cmd/kube-controller-manager@$v" \
    && go build -ldflags "$lf" -o "$out.tmp/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager)
  rm -rf "$out"; mv "$out.tmp" "$out"; rm -rf "$w"
}

build_node() { # kubelet + kube-scheduler (+ a static pause binary for the sandbox image)
  local v=$KUBERNETES_VERSION out="$cache/kubernetes-node-$KUBERNETES_VERSION/bin"
  have "$out/kubelet" "$out/kube-scheduler" "$out/pause" && { echo "node $v: cached"; return; }
  local w="$cache/kubernetes-node-$v/src"
  k8s_wrapper "$w" "$v"
  local ver="k8s.io/component-base/version" minor="${v#v1.}"; minor="${minor%%.*}"
  local lf="$ldflags -X $ver.gitVersion=$v -X $ver.gitMajor=1 -X $ver.gitMinor=$minor -X $ver.gitTreeState=clean"
  lf+=" -X k8s.io/client-go/pkg/version.gitVersion=$v -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  mkdir -p "$w/pause"
  cat >"$w/pause/main.go" <<'GO'
// pause: the pod sandbox's process; sleeps until SIGTERM/SIGINT and reaps nothing else.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	<-c
}
GO
  (cd "$w" && go get "k8s.io/kubernetes/cmd/kubelet@$v" "k8s.io/kubernetes/cmd/kube-scheduler@$v" \
    && go build -ldflags "$lf" -o "$out.tmp/" k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-scheduler \
    && go build -ldflags "$ldflags" -o "$out.tmp/pause" ./pause)
  rm -rf "$out"; mv "$out.tmp" "$out"; rm -rf "$w"
}

build_coredns() { # only the plugins the e2e Corefile uses: a much smaller build than the full coredns
  local v=$COREDNS_VERSION out="$cache/coredns-$COREDNS_VERSION/bin" w="$cache/coredns-$COREDNS_VERSION/src"
  have "$out/coredns" && { echo "coredns $v: cached"; return; }
  wrapper "$w" "require github.com/coredns/coredns $v"
  cat >"$w/main.go" <<'GO'
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	dnsserver.Directives = []string{"errors", "log", "health", "ready", "cache", "kubernetes"}
}

func main() { coremain.Run() }
GO
  (cd "$w" && go get "github.com/coredns/coredns@$v" && go mod tidy \
    && go build -ldflags "$ldflags" -o "$out.tmp/coredns" .)
  rm -rf "$out"; mv "$out.tmp" "$out"; rm -rf "$w"
}

build_etcd() {
  local v=$ETCD_VERSION out="$cache/etcd-$ETCD_VERSION/bin" w="$cache/etcd-$ETCD_VERSION/src" m req=""
  have "$out/etcd" && { echo "etcd $v: cached"; return; }
  # the modules server/v3 replaces with ../<dir>; client/v2 is tagged v2.305.<patch>
  for m in api/v3 client/pkg/v3 client/v3 pkg/v3 raft/v3 server/v3; do req+="require go.etcd.io/etcd/$m $v"$'\n'; done
  req+="require go.etcd.io/etcd/client/v2 v2.305.${v##*.}"
  wrapper "$w" "$req"
  (cd "$w" && go get "go.etcd.io/etcd/server/v3@$v" \
    && go build -ldflags "$ldflags" -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3)
  rm -rf "$out"; mv "$out.tmp" "$out"; rm -rf "$w"
}

build_helm() {
  local v=$HELM_VERSION out="$cache/helm-$HELM_VERSION/bin" w="$cache/helm-$HELM_VERSION/src"
  have "$out/helm" && { echo "helm $v: cached"; return; }
  wrapper "$w" "require helm.sh/helm/v3 $v"
  (cd "$w" && go get "helm.sh/helm/v3/cmd/helm@$v" \
    && go build -ldflags "$ldflags -X helm.sh/helm/v3/internal/version.version=$v" -o "$out.tmp/helm" helm.sh/helm/v3/cmd/helm)
  rm -rf "$out"; mv "$out.tmp" "$out"; rm -rf "$w"
}

build_minio() { # S3 server for the e2e suite (see e2e/README.md for why MinIO)
  local v=$MINIO_VERSION out="$cache/minio-$MINIO_VERSION/bin" w="$cache/minio-$MINIO_VERSION/src"
  have "$out/minio" && { echo "minio $v: cached"; return; }
  wrapper "$w" "require github.com/minio/minio $v"
  (cd "$w" && go get "github.com/minio/minio@$v" \
    && go build -ldflags "$ldflags" -o "$out.tmp/minio" github.com/minio/minio)
  rm -rf "$out"; mv "$out.tmp" "$out"; rm -rf "$w"
}

build_kserve() { # KServe's CRDs as released: the API server validates InferenceServices against them
  local v=$KSERVE_VERSION out="$cache/kserve-$KSERVE_VERSION/crds" dir f
  have_files() { for f in "$@"; do [[ -s $f ]] || return 1; done; }
  have_files "$out/serving.kserve.io_inferenceservices.yaml" "$out/serving.kserve.io_servingruntimes.yaml" \
    && { echo "kserve $v: cached"; return; }
  dir=$(cd "$cache" && go mod download -json "github.com/kserve/kserve@$v" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  rm -rf "$out.tmp"; mkdir -p "$out.tmp"
  for f in inferenceservices servingruntimes clusterservingruntimes; do
    cp "$dir/config/crd/full/serving.kserve.io_$f.yaml" "$out.tmp/"
  done
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_registry() { # the CNCF distribution registry, for publishing models as OCI artifacts
  # The stock cmd/registry links the Azure, GCS and S3 storage drivers (their SDKs are most of
  # its build time); the suite needs only the filesystem driver and htpasswd auth.
  local v=$REGISTRY_VERSION out="$cache/registry-$REGISTRY_VERSION/bin" w="$cache/registry-$REGISTRY_VERSION/src"
  have "$out/registry" && { echo "registry $v: cached"; return; }
  wrapper "$w" "require github.com/distribution/distribution/v3 $v"
  cat >"$w/main.go" <<'GO'
package main

import (
	"github.com/distribution/distribution/v3/registry"
	_ "github.com/distribution/distribution/v3/registry/auth/htpasswd"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
)

func main() { _ = registry.RootCmd.Execute() }
GO
  (cd "$w" && go get "github.com/distribution/distribution/v3@$v" && go mod tidy \
    && go build -ldflags "$ldflags -X github.com/distribution/distribution/v3/version.version=$v" -o "$out.tmp/registry" .)
  rm -rf "$out"; mv "$out.tmp" "$out"; rm -rf "$w"
}

build_kueue() { # Kueue's manager and its CRDs, for the shared-cluster (queueing) tests
  local v=$KUEUE_VERSION out="$cache/kueue-$KUEUE_VERSION" w="$cache/kueue-$KUEUE_VERSION/src" dir
  have "$out/bin/kueue" && [[ -s $out/crds/kueue.x-k8s.io_workloads.yaml && -s $out/crds/rbac-secrets-role.yaml ]] \
    && { echo "kueue $v: cached"; return; }
  # sigs.k8s.io/kueue has no replace directives; a wrapper module keeps the build out of the repo and
  # lets `go build` use the module's own go.sum-pinned dependencies.
  wrapper "$w" "require sigs.k8s.io/kueue $v"
  (cd "$w" && go get "sigs.k8s.io/kueue/cmd/kueue@$v" \
    && go build -ldflags "$ldflags -X sigs.k8s.io/kueue/pkg/version.GitVersion=$v" -o "$out/bin.tmp/kueue" sigs.k8s.io/kueue/cmd/kueue)
  dir=$(cd "$cache" && go mod download -json "sigs.k8s.io/kueue@$v" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  rm -rf "$out/crds.tmp"; mkdir -p "$out/crds.tmp"
  cp "$dir"/config/components/crd/bases/kueue.x-k8s.io_*.yaml "$out/crds.tmp/"
  # the manager's RBAC and webhook configurations as released (harness/kueue.py installs them)
  cp "$dir/config/components/rbac/role.yaml" "$out/crds.tmp/rbac-role.yaml"
  cp "$dir/config/components/rbac/manager_secrets_role.yaml" "$out/crds.tmp/rbac-secrets-role.yaml"
  cp "$dir/config/components/webhook/manifests.yaml" "$out/crds.tmp/webhook-manifests.yaml"
  rm -rf "$out/bin" "$out/crds"; mv "$out/bin.tmp" "$out/bin"; mv "$out/crds.tmp" "$out/crds"; rm -rf "$w"
}

build_coscheduling() { # the scheduler-plugins gang scheduler (Coscheduling) + the PodGroup CRD
  local v=$SCHEDULER_PLUGINS_VERSION out="$cache/coscheduling-$SCHEDULER_PLUGINS_VERSION" dir
  local w="$cache/coscheduling-$SCHEDULER_PLUGINS_VERSION/src"
  have "$out/bin/kube-scheduler" && [[ -s $out/crds/scheduling.x-k8s.io_podgroups.yaml ]] \
    && { echo "coscheduling $v: cached"; return; }
  # sigs.k8s.io/scheduler-plugins replaces every k8s.io module with its v0.32.x tag; its replaces do not apply
  # in a wrapper module, so the wrapper maps them (and k8s.io/kubernetes) to the control plane's own tags: the
  # same sources the cached kube-scheduler was built from, so most of its packages come from GOCACHE.
  k8s_wrapper "$w" "$KUBERNETES_VERSION"
  printf 'require sigs.k8s.io/scheduler-plugins %s\nreplace k8s.io/kubernetes => k8s.io/kubernetes %s\n' \
    "$v" "$KUBERNETES_VERSION" >>"$w/go.mod"
  cat >"$w/main.go" <<'GO'
// kube-scheduler with the Coscheduling (gang) plugin of sigs.k8s.io/scheduler-plugins, and nothing else of it.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kube-scheduler/app"
	_ "sigs.k8s.io/scheduler-plugins/apis/config/scheme"
	"sigs.k8s.io/scheduler-plugins/pkg/coscheduling"
)

func main() {
	os.Exit(cli.Run(app.NewSchedulerCommand(app.WithPlugin(coscheduling.Name, coscheduling.New))))
}
GO
  local ver="k8s.io/component-base/version" minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
  local lf="$ldflags -X $ver.gitVersion=$KUBERNETES_VERSION -X $ver.gitMajor=1 -X $ver.gitMinor=$minor -X $ver.gitTreeState=clean"
  (cd "$w" && go get "sigs.k8s.io/scheduler-plugins@$v" && go mod tidy \
    && go build -ldflags "$lf" -o "$out/bin.tmp/kube-scheduler" .)
  dir=$(cd "$cache" && go mod download -json "sigs.k8s.io/scheduler-plugins@$v" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  rm -rf "$out/crds.tmp"; mkdir -p "$out/crds.tmp"
  cp "$dir/config/crd/bases/scheduling.x-k8s.io_podgroups.yaml" "$out/crds.tmp/"
  rm -rf "$out/bin" "$out/crds"; mv "$out/bin.tmp" "$out/bin"; mv "$out/crds.tmp" "$out/crds"; rm -rf "$w"
}

# Default: everything the default (real-kubelet) suite needs, in the order the e2e session needs it when
# .ci/run builds in the background while the tests run (the session's first test starts a cluster: the control
# plane, a node, CoreDNS, MinIO and the chart by helm; the Coscheduling and Kueue modules come minutes later).
# One lock per component: a concurrent caller (a test fixture needing one binary) waits only for the component
# it asks for.
start=$SECONDS
for c in ${KUBETUNE_E2E_COMPONENTS:-kubernetes etcd node coredns minio helm registry kserve coscheduling kueue}; do
  t=$SECONDS
  exec 9>"$cache/.build-$c.lock" && flock 9 && "build_$c" && exec 9>&-
  echo "build.sh: $c done in $((SECONDS - t))s"
done
echo "build.sh: all done in $((SECONDS - start))s (cache: $cache)"
