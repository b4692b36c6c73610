#!/usr/bin/env bash
# make infra-check: the Terraform deployment checked offline, on a fresh machine.
#
#   setup     tools into the machine's cache (venvs keyed by their requirements and Python, the
#             pinned cdktn-provider-google wheel: shared by every clone on the machine), then into
#             this clone's .cache/infra the provider schema derived from it and the schema-serving
#             stand-in provider in a filesystem mirror
#   fmt       terraform fmt -check, and shellcheck on infra/*.sh and this script
#   validate  terraform init -backend=false + validate, against the stand-in (no network)
#   test      terraform test (mock_provider) and the pytest that breaks the module on purpose
#   scan      checkov --skip-download and trivy config
#
# `check.sh` runs them all in that order; `check.sh setup` only prepares (tests/test_infra.py uses it).
# Terraform itself is preinstalled (it is not in the package registries).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
# This clone's files (schema, mirror, work dir: all derived from this clone's code) ...
CACHE=${AIFN_INFRA_CACHE:-$PWD/.cache/infra}
# ... and the machine's tools, which depend only on their pinned requirements.
TOOLS=${AIFN_INFRA_TOOLS:-${AIFN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/aifn}/infra}
MODULE=infra/terraform
# The bindings generated from hashicorp/google 8.7.0, and what the wheel must hash to.
CDKTN_VERSION=21.1.0
CDKTN_SHA256=157dead5025d5db5abe48e40cc49f0b6a4d8088fd0498eb17ad5a36bca811b2a
PROVIDER_VERSION=8.7.0
# A venv's name says what is in it: the requirements file's hash and the Python that runs it.
venv_key() { { cat "$1"; "$PYTHON" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16; }
TOOLS_VENV=$TOOLS/venv-$(venv_key infra/tools/requirements.txt)
CHECKOV_VENV=$TOOLS/checkov-venv-$(venv_key infra/tools/requirements-checkov.txt)
export CHECKPOINT_DISABLE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export TF_CLI_CONFIG_FILE=$CACHE/terraformrc
export TF_IN_AUTOMATION=1

step() { printf '\n-- infra-check: %s\n' "$1"; }

need_terraform() {
  command -v terraform >/dev/null || {
    echo "infra-check: terraform is not on PATH. Install Terraform >= 1.9 (https://developer.hashicorp.com/terraform/install); it is not in the package registries." >&2
    exit 1
  }
}

venv() {  # venv DIR PIP-ARGS...  (DIR's name carries its inputs' hash; complete once stamped)
  local dir=$1
  shift 1
  local stamp=$dir/.installed
  if [ -f "$stamp" ]; then return; fi
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  "$dir/bin/python" -m pip install --quiet "$@" 2>&1 | quiet_pip
  touch "$stamp"
}

# pip on these machines warns about local index folders that do not exist; the rest is shown.
quiet_pip() { grep -v "^WARNING: Location 'file:" || true; }

setup() {
  need_terraform
  mkdir -p "$CACHE" "$TOOLS"
  # One clone at a time installs into the machine's tools; the others wait, then reuse them.
  exec 9>"$TOOLS/.lock"
  flock 9
  venv "$TOOLS_VENV" -r infra/tools/requirements.txt
  venv "$CHECKOV_VENV" -r infra/tools/requirements-checkov.txt

  local wheel=$TOOLS/cdktn_provider_google-$CDKTN_VERSION-py3-none-any.whl
  if [ ! -f "$wheel" ]; then
    "$TOOLS_VENV/bin/python" -m pip download --quiet --no-deps --dest "$TOOLS" "cdktn-provider-google==$CDKTN_VERSION" 2>&1 | quiet_pip
  fi
  flock -u 9
  # Linked into this clone's cache, where tests/test_infra.py finds it.
  ln -sfn "$wheel" "$CACHE/"
  "$TOOLS_VENV/bin/python" infra/tools/provider_schema.py --wheel "$wheel" --sha256 "$CDKTN_SHA256" \
    --config "$MODULE" --out "$CACHE/schema.json"
  rm -rf "$CACHE/mirror"
  "$TOOLS_VENV/bin/python" infra/tools/standin_provider.py install \
    --schema "$CACHE/schema.json" --mirror "$CACHE/mirror" --version "$PROVIDER_VERSION"
  # Only the mirror: Terraform must never reach for a registry.
  cat >"$TF_CLI_CONFIG_FILE" <<EOF
provider_installation {
  filesystem_mirror {
    path    = "$CACHE/mirror"
    include = ["registry.terraform.io/hashicorp/google"]
  }
  direct {
    exclude = ["*/*/*"]
  }
}
EOF
}

# The module is copied to a work dir, so that the stand-in's .terraform/ and lock file (whose
# checksum would break a real `terraform init`) never land in the repository.
# One work dir per run: two runs in one clone (two engineers, or a run and the tests) must not
# delete each other's .terraform/ halfway through.
workdir() {
  local work
  work=$(mktemp -d "$CACHE/work.XXXXXX")
  tar -C "$MODULE" --exclude .terraform --exclude .terraform.lock.hcl --exclude '*.tfstate*' --exclude terraform.tfvars -c . \
    | tar -C "$work" -x
  echo "$work"
}

check_fmt() {
  step "terraform fmt -check"
  terraform fmt -check -recursive -diff "$MODULE"
  step "shellcheck (make deploy, make destroy, this check)"
  "$TOOLS_VENV/bin/shellcheck" infra/*.sh infra/tools/*.sh
}

check_validate() {
  local work=$1
  step "terraform init -backend=false (stand-in provider from the filesystem mirror)"
  terraform -chdir="$work" init -backend=false -input=false -no-color >"$work/init.log" 2>&1 \
    || { cat "$work/init.log"; exit 1; }
  grep -E "Installed hashicorp/google" "$work/init.log"
  step "terraform validate"
  terraform -chdir="$work" validate -no-color
}

check_test() {
  local work=$1
  step "terraform test"
  terraform -chdir="$work" test -no-color
  step "pytest tests/test_infra.py (broken variants must fail validate)"
  AIFN_INFRA_CACHE=$CACHE "$TOOLS_VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_infra.py
}

check_scan() {
  step "checkov --skip-download"
  "$CHECKOV_VENV/bin/checkov" --quiet --compact --skip-download --framework terraform \
    --directory "$MODULE" --skip-path tests
  step "trivy config"
  "$TOOLS_VENV/bin/trivy" config --quiet --skip-check-update --cache-dir "$CACHE/trivy" \
    --exit-code 1 --severity LOW,MEDIUM,HIGH,CRITICAL "$MODULE"
}

case "${1:-all}" in
  setup) setup ;;
  all)
    started=$(date +%s)
    setup
    check_fmt
    work=$(workdir)
    trap 'rm -rf "$work"' EXIT
    check_validate "$work"
    check_test "$work"
    check_scan
    printf '\n-- infra-check: passed in %ss\n' "$(($(date +%s) - started))"
    ;;
  *) echo "usage: $0 [setup|all]" >&2; exit 2 ;;
esac
