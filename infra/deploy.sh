#!/usr/bin/env bash
# make deploy PROJECT=<project-id> REGION=<region>: from an empty Google Cloud project (billing on,
# `gcloud auth login` done) to the two function URLs, in stages, each idempotent:
#
#   0. bootstrap   gcloud: the APIs Terraform itself needs, the Eventarc and Pub/Sub service
#                  identities, and the state bucket <project>-tfstate (versioned, uniform
#                  bucket-level access, public access prevention), unless --local-state
#   1. registry    terraform init (gcs backend) + a targeted apply: the APIs, the Artifact
#                  Registry repository, Cloud Build's service account and its source bucket
#   2. images      <function>:<tag> for both functions, tag = the commit (plus a hash of local
#                  changes), built by Cloud Build (cloudbuild.yaml, _DEPLOY=false) or the local
#                  Docker (--builder docker); a tag already in the repository is not rebuilt
#   3. apply       the full terraform apply with image_tag=<tag>
#   4. delivery    each Eventarc trigger's Pub/Sub subscription gets its dead-letter policy
#                  (output batch_dead_letter: Terraform cannot manage that subscription)
#   5. check       each function's /v1/health with an ID token; prints the URLs and curl commands
#
# Re-running it changes nothing unless the code (the tag) or the configuration changed.
# --dry-run prints every command instead of running it (nothing is read from or sent to Google
# Cloud). infra/terraform/terraform.tfvars, if present, is read by Terraform as usual; the
# options below win over it.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: infra/deploy.sh --project PROJECT_ID --region REGION [options]
  --name-prefix P     resource name prefix (Terraform's name_prefix; default aifn)
  --tag TAG           image tag to build and deploy (default: the commit, plus -dirty-<hash>
                      of uncommitted changes)
  --builder B         cloudbuild (default) or docker (the local engine; runs make model first)
  --state-bucket B    Terraform state bucket (default <project>-tfstate)
  --local-state       keep the state in infra/terraform/terraform.tfstate instead (explicit
                      opt-in: the state holds secrets, see infra/terraform/README.md)
  --dry-run           print the commands, run nothing
  -h, --help          this help
Environment: PROJECT and REGION stand in for --project and --region.
EOF
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TF_DIR=$ROOT/infra/terraform
PROJECT=${PROJECT:-}
REGION=${REGION:-}
PREFIX=aifn
TAG=
BUILDER=cloudbuild
STATE_BUCKET=
LOCAL_STATE=false
DRY_RUN=false
FUNCTIONS=(sentiment classify)

# What stage 1 creates before any image exists (tests/test_infra.py holds this list equal to
# the targets of infra/terraform/tests/deploy_steps.tftest.hcl).
STAGE1_TARGETS=(
  google_project_service.enabled
  google_artifact_registry_repository.images
  google_service_account.cloud_build
  google_artifact_registry_repository_iam_member.cloud_build_writer
  google_project_iam_member.cloud_build_logs
  google_storage_bucket.build_sources
  google_storage_bucket_iam_member.build_sources
)
# APIs Terraform needs before it can enable the others (google_project_service calls the
# Service Usage API, IAM checks go through Resource Manager), and the ones whose service agents
# must exist before the first apply grants them roles.
BOOTSTRAP_APIS=(serviceusage.googleapis.com cloudresourcemanager.googleapis.com storage.googleapis.com
  iam.googleapis.com eventarc.googleapis.com pubsub.googleapis.com)

while [ $# -gt 0 ]; do
  case $1 in
    --project) PROJECT=$2; shift 2 ;;
    --region) REGION=$2; shift 2 ;;
    --name-prefix) PREFIX=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --builder) BUILDER=$2; shift 2 ;;
    --state-bucket) STATE_BUCKET=$2; shift 2 ;;
    --local-state) LOCAL_STATE=true; shift ;;
    --dry-run) DRY_RUN=true; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "deploy: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

die() { echo "deploy: $*" >&2; exit 1; }
step() { printf '\n== deploy: %s\n' "$*"; }
# run CMD...: runs it, or prints it under --dry-run.
run() {
  if $DRY_RUN; then printf '+ %s\n' "$*"; else "$@"; fi
}
# exists CMD...: true when the read-only query succeeds; under --dry-run nothing exists yet, so
# the dry run prints what a first deployment does.
exists() {
  if $DRY_RUN; then return 1; fi
  "$@" >/dev/null 2>&1
}

[ -n "$PROJECT" ] || { usage >&2; die "--project (or PROJECT=) is required, e.g. make deploy PROJECT=my-project REGION=europe-west1"; }
[ -n "$REGION" ] || { usage >&2; die "--region (or REGION=) is required, e.g. europe-west1"; }
[[ $PROJECT =~ ^[a-z][a-z0-9-]{4,28}[a-z0-9]$ ]] || die "PROJECT must be a project ID (not a name or number): $PROJECT"
[[ $REGION =~ ^[a-z]+(-[a-z]+)+[0-9]+$ ]] || die "REGION must be a region such as europe-west1 (not a zone): $REGION"
case $BUILDER in cloudbuild | docker) ;; *) die "--builder must be cloudbuild or docker" ;; esac
STATE_BUCKET=${STATE_BUCKET:-$PROJECT-tfstate}
REPO=$REGION-docker.pkg.dev/$PROJECT/$PREFIX

if [ -z "$TAG" ]; then
  TAG=$(git -C "$ROOT" rev-parse --short=12 HEAD)
  if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no)" ]; then
    # Same uncommitted changes, same tag: a re-run still finds its images.
    TAG=$TAG-dirty-$(git -C "$ROOT" diff HEAD | sha256sum | cut -c1-8)
  fi
fi

export CHECKPOINT_DISABLE=1 TF_IN_AUTOMATION=1
tf() { run terraform -chdir="$TF_DIR" "$@"; }
TF_VARS=(-var "project_id=$PROJECT" -var "region=$REGION" -var "name_prefix=$PREFIX" -var "image_tag=$TAG")

step "checks"
if ! $DRY_RUN; then
  for tool in gcloud terraform git python3; do
    command -v "$tool" >/dev/null || die "$tool is not on PATH (prerequisites: infra/terraform/README.md)"
  done
  [ "$BUILDER" = cloudbuild ] || command -v docker >/dev/null || die "--builder docker needs docker on PATH"
  tf_version=$(terraform version -json | python3 -c 'import json, sys; print(json.load(sys.stdin)["terraform_version"])')
  python3 -c 'import sys; v = tuple(map(int, sys.argv[1].split(".")[:2])); sys.exit(v < (1, 11))' "$tf_version" \
    || die "Terraform $tf_version is too old: 1.11 or later is needed (write-only arguments)"
  gcloud auth print-access-token >/dev/null 2>&1 || die "gcloud is not logged in: run gcloud auth login"
  # Terraform and its gcs backend use Application Default Credentials when they exist, else the
  # gcloud login's token (valid an hour: enough for one deployment).
  if ! gcloud auth application-default print-access-token >/dev/null 2>&1; then
    GOOGLE_OAUTH_ACCESS_TOKEN=$(gcloud auth print-access-token)
    export GOOGLE_OAUTH_ACCESS_TOKEN
  fi
fi
echo "project $PROJECT, region $REGION, prefix $PREFIX, image tag $TAG, builder $BUILDER"

step "0. bootstrap: APIs, service identities, state bucket"
run gcloud services enable "${BOOTSTRAP_APIS[@]}" --project "$PROJECT"
# The service agents Terraform grants roles to must exist first (google_project_service_identity,
# which would create them, is in the google-beta provider only).
for api in eventarc.googleapis.com pubsub.googleapis.com; do
  run gcloud beta services identity create --service "$api" --project "$PROJECT" --quiet
done
if $LOCAL_STATE; then
  echo "local state (--local-state): $TF_DIR/terraform.tfstate, which will hold secrets in plain text"
  if $DRY_RUN; then
    printf '+ write %s\n' "$TF_DIR/local_backend_override.tf"
  else
    printf '%s\n' '# Written by infra/deploy.sh --local-state: state in terraform.tfstate (see README).' \
      'terraform {' '  backend "local" {}' '}' >"$TF_DIR/local_backend_override.tf"
  fi
else
  if exists gcloud storage buckets describe "gs://$STATE_BUCKET" --project "$PROJECT"; then
    echo "state bucket gs://$STATE_BUCKET exists"
  else
    run gcloud storage buckets create "gs://$STATE_BUCKET" --project "$PROJECT" --location "$REGION" \
      --uniform-bucket-level-access --public-access-prevention
  fi
  # Every state version kept: a bad apply or a corrupted write can be rolled back.
  run gcloud storage buckets update "gs://$STATE_BUCKET" --versioning
  if [ -f "$TF_DIR/local_backend_override.tf" ]; then
    die "$TF_DIR/local_backend_override.tf exists (an earlier --local-state run): pass --local-state, or delete it and run terraform init -migrate-state with the gcs backend"
  fi
fi

step "1. registry: terraform init, then APIs, Artifact Registry and Cloud Build's account"
if $LOCAL_STATE; then
  tf init -input=false
else
  tf init -input=false -backend-config="bucket=$STATE_BUCKET" -backend-config="prefix=aifn/$PREFIX"
fi
targets=()
for t in "${STAGE1_TARGETS[@]}"; do targets+=("-target=$t"); done
tf apply -input=false -auto-approve "${TF_VARS[@]}" "${targets[@]}"

step "2. images: $REPO/<function>:$TAG"
missing=()
for f in "${FUNCTIONS[@]}"; do
  if exists gcloud artifacts docker images describe "$REPO/$f:$TAG" --project "$PROJECT"; then
    echo "$REPO/$f:$TAG exists (tags are immutable): not rebuilt"
  else
    missing+=("$f")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$BUILDER" = cloudbuild ]; then
    if $DRY_RUN; then
      sa="<terraform output cloud_build_service_account>"
      src="<terraform output build_source_bucket>"
    else
      if ! sa=$(terraform -chdir="$TF_DIR" output -raw cloud_build_service_account 2>/dev/null) \
        || ! src=$(terraform -chdir="$TF_DIR" output -raw build_source_bucket 2>/dev/null); then
        die "no Cloud Build service account (cloud_build.enabled = false?): deploy with DEPLOY_ARGS=\"--builder docker\""
      fi
    fi
    # cloudbuild.yaml builds what is missing and skips tags that exist; _DEPLOY=false: the
    # services do not exist yet, Terraform creates them in stage 3.
    run gcloud builds submit "$ROOT" --project "$PROJECT" --config "$ROOT/cloudbuild.yaml" \
      --service-account "projects/$PROJECT/serviceAccounts/$sa" \
      --gcs-source-staging-dir "gs://$src/source" \
      --substitutions "COMMIT_SHA=$TAG,_REGION=$REGION,_REPOSITORY=$PREFIX,_SERVICE_PREFIX=$PREFIX,_DEPLOY=false,_TESTS=false"
  else
    run make -C "$ROOT" model
    run gcloud auth configure-docker "$REGION-docker.pkg.dev" --quiet
    for f in "${missing[@]}"; do
      run env DOCKER_BUILDKIT=1 docker build --build-arg "FUNCTION=$f" -t "$REPO/$f:$TAG" "$ROOT"
      run docker push "$REPO/$f:$TAG"
    done
  fi
fi

step "3. apply: everything else (Memorystore takes ~5 of the ~10-15 minutes)"
tf apply -input=false -auto-approve "${TF_VARS[@]}"

step "4. delivery: dead-letter policy on each Eventarc trigger's subscription"
if $DRY_RUN; then
  echo "+ terraform output -json batch_dead_letter: run each function's commands"
else
  terraform -chdir="$TF_DIR" output -json batch_dead_letter | python3 -c '
import json, sys
for name, d in sorted(json.load(sys.stdin).items()):
    for command in d["commands"]:
        print(command)
' | while read -r command; do
    read -ra argv <<<"$command"
    echo "+ $command"
    "${argv[@]}" --project "$PROJECT" --quiet >/dev/null
  done
fi

step "5. check: the functions answer"
if $DRY_RUN; then
  urls=("sentiment=<url>" "classify=<url>")
else
  mapfile -t urls < <(terraform -chdir="$TF_DIR" output -json function_urls \
    | python3 -c 'import json, sys; [print(f"{k}={v}") for k, v in sorted(json.load(sys.stdin).items())]')
  token=$(gcloud auth print-identity-token)
  for pair in "${urls[@]}"; do
    url=${pair#*=}
    ok=false
    for _ in $(seq 30); do
      if curl -fsS -o /dev/null -H "Authorization: Bearer $token" "$url/v1/health"; then ok=true; break; fi
      sleep 4
    done
    $ok || die "${pair%%=*} at $url did not answer /v1/health within 2 minutes: see gcloud run services logs read $PREFIX-${pair%%=*} --region $REGION"
    echo "${pair%%=*}: $url/v1/health answers"
  done
fi

url_of() {
  local pair
  for pair in "${urls[@]}"; do
    if [ "${pair%%=*}" = "$1" ]; then echo "${pair#*=}"; fi
  done
}

cat <<EOF

Deployed $TAG to $PROJECT ($REGION).
$(for pair in "${urls[@]}"; do echo "  ${pair%%=*}: ${pair#*=}"; done)

Call them (as a project owner, or a member of Terraform's invokers):
  curl -s "$(url_of sentiment)/v1/analyze/sentiment" -H "Authorization: Bearer \$(gcloud auth print-identity-token)" \\
    -H 'Content-Type: application/json' -d '{"text": "The new dashboard is fantastic."}'
  curl -s "$(url_of classify)/v1/classify" -H "Authorization: Bearer \$(gcloud auth print-identity-token)" \\
    -H 'Content-Type: application/json' \\
    -d '{"text": "I was charged twice.", "labels": ["billing", "bug report", "feature request"]}'
EOF
