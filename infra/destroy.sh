#!/usr/bin/env bash
# make destroy PROJECT=<project-id> REGION=<region>: tear down what make deploy created.
#
#   1. unlock      terraform apply with deletion_protection=false (and force_destroy_buckets=true
#                  with --delete-data), at the deployed image tag, so nothing else changes
#   2. destroy     terraform destroy
#   3. the subnet  Cloud Run releases the Direct VPC egress addresses of deleted services only
#                  1-2 hours later (cloud.google.com/run/docs/configuring/vpc-direct-vpc, "delete
#                  the subnet"): until then the subnet cannot be deleted and destroy stops there,
#                  with everything else gone. Run make destroy again later (the subnet and VPC
#                  cost nothing meanwhile), or pass --wait to retry every 10 minutes for 3 hours.
#
# The state bucket (<project>-tfstate) is kept: it holds the state (and the history of every
# version). Delete it yourself once the destroy is complete:
#   gcloud storage rm --recursive gs://<project>-tfstate
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: infra/destroy.sh --project PROJECT_ID --region REGION [options]
  --name-prefix P    resource name prefix (default aifn)
  --state-bucket B   Terraform state bucket (default <project>-tfstate)
  --local-state      the state is in infra/terraform/terraform.tfstate (deploy --local-state)
  --delete-data      also delete the buckets' objects (models, inputs, predictions); without it
                     destroy stops at a non-empty bucket
  --wait             retry the destroy every 10 minutes, up to 3 hours, while the subnet is held
  --dry-run          print the commands, run nothing
USAGE
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TF_DIR=$ROOT/infra/terraform
PROJECT=${PROJECT:-}
REGION=${REGION:-}
PREFIX=aifn
STATE_BUCKET=
LOCAL_STATE=false
DELETE_DATA=false
WAIT=false
DRY_RUN=false

while [ $# -gt 0 ]; do
  case $1 in
    --project) PROJECT=$2; shift 2 ;;
    --region) REGION=$2; shift 2 ;;
    --name-prefix) PREFIX=$2; shift 2 ;;
    --state-bucket) STATE_BUCKET=$2; shift 2 ;;
    --local-state) LOCAL_STATE=true; shift ;;
    --delete-data) DELETE_DATA=true; shift ;;
    --wait) WAIT=true; shift ;;
    --dry-run) DRY_RUN=true; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "destroy: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

die() { echo "destroy: $*" >&2; exit 1; }
step() { printf '\n== destroy: %s\n' "$*"; }
run() {
  if $DRY_RUN; then printf '+ %s\n' "$*"; else "$@"; fi
}

[ -n "$PROJECT" ] || { usage >&2; die "--project (or PROJECT=) is required"; }
[ -n "$REGION" ] || { usage >&2; die "--region (or REGION=) is required"; }
STATE_BUCKET=${STATE_BUCKET:-$PROJECT-tfstate}
export CHECKPOINT_DISABLE=1 TF_IN_AUTOMATION=1
tf() { run terraform -chdir="$TF_DIR" "$@"; }

if ! $DRY_RUN; then
  command -v terraform >/dev/null || die "terraform is not on PATH"
  if ! gcloud auth application-default print-access-token >/dev/null 2>&1; then
    GOOGLE_OAUTH_ACCESS_TOKEN=$(gcloud auth print-access-token) || die "gcloud is not logged in: run gcloud auth login"
    export GOOGLE_OAUTH_ACCESS_TOKEN
  fi
fi

step "init"
if $LOCAL_STATE; then
  tf init -input=false
else
  tf init -input=false -backend-config="bucket=$STATE_BUCKET" -backend-config="prefix=aifn/$PREFIX"
fi

if $DRY_RUN; then
  tag="<terraform output image_tag>"
else
  tag=$(terraform -chdir="$TF_DIR" output -raw image_tag 2>/dev/null) \
    || die "no deployment in this state (terraform output image_tag is empty): nothing to destroy"
fi
vars=(-var "project_id=$PROJECT" -var "region=$REGION" -var "name_prefix=$PREFIX" -var "image_tag=$tag"
  -var deletion_protection=false -var "force_destroy_buckets=$DELETE_DATA")

step "1. unlock: deletion_protection=false, force_destroy_buckets=$DELETE_DATA"
tf apply -input=false -auto-approve "${vars[@]}"

step "2. destroy"
deadline=$(($(date +%s) + 3 * 3600))
while true; do
  if tf destroy -input=false -auto-approve "${vars[@]}"; then
    echo "destroyed. The state bucket gs://$STATE_BUCKET is kept; delete it with: gcloud storage rm --recursive gs://$STATE_BUCKET"
    exit 0
  fi
  left=$(terraform -chdir="$TF_DIR" state list 2>/dev/null | grep -v '^data\.' || true)
  if [ -n "$left" ] && ! grep -qv -e '^google_compute_subnetwork\.' -e '^google_compute_network\.' \
    -e '^google_project_service\.' <<<"$left"; then
    cat >&2 <<MSG

destroy: everything is gone but the VPC subnet ($PREFIX-run) and network. Cloud Run still holds
the subnet's Direct VPC egress addresses of the deleted services, and releases them 1-2 hours
after the services are deleted; until then Google refuses to delete the subnet. Nothing left
costs money. Run make destroy again in 1-2 hours$($WAIT && echo "; retrying every 10 minutes (--wait)").
MSG
    if $WAIT && [ "$(date +%s)" -lt "$deadline" ]; then
      sleep 600
      continue
    fi
    exit 3
  fi
  die "terraform destroy failed (above); what is left: ${left:-nothing in the state}"
done
