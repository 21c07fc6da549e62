#!/usr/bin/env bash
# Lint the GitHub Actions workflows with actionlint, built once from its Go module and cached beside the
# e2e binaries. tests/test_release.py runs it, so CI fails on a workflow that would fail on GitHub.
#   bash .ci/actionlint.sh [files...]      (default: .github/workflows/*.yml)
set -euo pipefail
cd "$(dirname "$0")/.."
version=v1.7.12
dir=${KUBETUNE_E2E_CACHE:-$HOME/.cache/kubetune-e2e}/actionlint-$version
if [[ ! -x $dir/bin/actionlint ]]; then
  mkdir -p "$dir"
  (
    flock 9
    if [[ ! -x $dir/bin/actionlint ]]; then
      rm -rf "$dir/bin.tmp"
      GOBIN="$dir/bin.tmp" go install "github.com/rhysd/actionlint/cmd/actionlint@$version"
      mv "$dir/bin.tmp" "$dir/bin"
    fi
  ) 9>"$dir/.lock"
fi
exec "$dir/bin/actionlint" "$@"
