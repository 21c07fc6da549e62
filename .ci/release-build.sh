#!/usr/bin/env bash
# The release's build steps that need no registry: the Python package (sdist + wheel) and the Helm chart
# package, into DIR (default dist/). The release workflow (.github/workflows/release.yml) runs this script;
# tests/test_release.py runs it in CI, so a change that breaks the release build fails before a tag does.
#   bash .ci/release-build.sh [DIR]        # needs: python with `build`, helm (HELM=... to choose one)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist}
python=${PYTHON:-python3}
helm=${HELM:-helm}
version=$("$python" -c 'import sys; sys.path.insert(0, "operator"); import kubetune; print(kubetune.__version__)')
if [[ -n "${RELEASE_TAG:-}" && "${RELEASE_TAG#v}" != "$version" ]]; then
  echo "release-build: tag $RELEASE_TAG does not match kubetune.__version__ $version (operator/kubetune/__init__.py)" >&2
  exit 1
fi
mkdir -p "$out"
trap 'rm -rf build kubetune.egg-info' EXIT  # setuptools' in-tree scratch
"$python" -m build --sdist --wheel --outdir "$out" . >"$out/build.log" 2>&1 || { cat "$out/build.log" >&2; exit 1; }
"$helm" lint --strict charts/kubetune >/dev/null
"$helm" package charts/kubetune --destination "$out" >/dev/null
cp crds/kubetune.io_finetunejobs.yaml "$out/"  # a release asset: the CRD for `kubectl apply --server-side -f <url>`
echo "release-build: kubetune $version -> $(cd "$out" && ls kubetune-"$version"* | tr '\n' ' ')"
