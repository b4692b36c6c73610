# Identity and access. Each function runs as its own service account with only what it needs:
# write logs and metrics, read the Redis AUTH secret; its batch path runs as a second account
# that may also read and write objects in the batch bucket, and nothing else.
# Callers: the members in var.invokers, and allUsers only through var.allow_unauthenticated.

locals {
  project_roles = ["roles/logging.logWriter", "roles/monitoring.metricWriter"]

  # One identity per function and path: "sentiment" (HTTP) and "sentiment-batch" (batch).
  identities = merge(
    { for name in keys(var.functions) : name => "HTTP service of the ${name} function" },
    var.batch.enabled ? { for name in keys(var.functions) : "${name}-batch" => "batch service and job of the ${name} function" } : {},
  )
  identity_roles = {
    for pair in setproduct(keys(local.identities), local.project_roles) : "${pair[0]} ${pair[1]}" => {
      identity = pair[0]
      role     = pair[1]
    }
  }

  invoker_members = concat(var.invokers, var.allow_unauthenticated ? ["allUsers"] : [])
  invoker_grants = {
    for pair in setproduct(keys(var.functions), local.invoker_members) : "${pair[0]} ${pair[1]}" => {
      function = pair[0]
      member   = pair[1]
    }
  }
}

resource "google_service_account" "function" {
  for_each = local.identities

  project      = var.project_id
  account_id   = "${var.name_prefix}-${each.key}"
  display_name = "AI functions: ${each.value}"

  depends_on = [google_project_service.enabled]
}

resource "google_project_iam_member" "function" {
  for_each = local.identity_roles

  project = var.project_id
  role    = each.value.role
  member  = google_service_account.function[each.value.identity].member
}

# The AUTH string, readable by the functions' identities only (on this secret, not the project).
resource "google_secret_manager_secret_iam_member" "redis_auth" {
  for_each = var.redis.enabled ? local.identities : {}

  project   = var.project_id
  secret_id = google_secret_manager_secret.redis_auth[0].secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = google_service_account.function[each.key].member
}

resource "google_cloud_run_v2_service_iam_member" "invoker" {
  for_each = local.invoker_grants

  project  = var.project_id
  location = var.region
  name     = local.services[each.value.function].name
  role     = "roles/run.invoker"
  member   = each.value.member
}

# Cloud Build's identity for cloudbuild.yaml (`gcloud builds submit --service-account=<this>`, or
# a trigger's service account), with exactly what its steps do:
#   build-/push-<f>  push to this deployment's repository  -> artifactregistry.writer on the repository
#   resolve          read an existing tag's digest         -> (the same role)
#   deploy           `gcloud run services|jobs update --image` on services and jobs Terraform
#                    created -> run.developer on each of them (update, never create: the role is
#                    granted on the resources, so the account cannot create a service at all);
#                    a revision runs as the function's account -> iam.serviceAccountUser on those
#                    accounts only
#   all steps        build logs (options.logging CLOUD_LOGGING_ONLY) -> logging.logWriter
#   fetch the source `gcloud builds submit --gcs-source-staging-dir` uploads -> objectViewer on
#                    the build-sources bucket only (storage.tf)
# The test step needs nothing from the project. A user-specified build account has none of the
# legacy Cloud Build account's project-wide rights.
locals {
  cloud_build = var.cloud_build.enabled
  # What CI updates: each HTTP service, and the batch service and job when batch is on.
  ci_services = local.cloud_build ? merge(
    { for name, s in local.services : name => s.name },
    { for name, s in local.batch_services : "${name}-batch" => s.name },
  ) : {}
  ci_jobs = local.cloud_build ? { for name, j in local.batch_jobs : name => j.name } : {}
  # The runtime accounts of what CI deploys (HTTP and batch identities, not Eventarc's).
  ci_act_as = local.cloud_build ? local.identities : {}
}

resource "google_service_account" "cloud_build" {
  count = local.cloud_build ? 1 : 0

  project      = var.project_id
  account_id   = "${var.name_prefix}-cloudbuild"
  display_name = "AI functions: Cloud Build (cloudbuild.yaml): push images, roll them out"

  depends_on = [google_project_service.enabled]
}

resource "google_artifact_registry_repository_iam_member" "cloud_build_writer" {
  count = local.cloud_build ? 1 : 0

  project    = var.project_id
  location   = var.region
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.writer"
  member     = google_service_account.cloud_build[0].member
}

resource "google_project_iam_member" "cloud_build_logs" {
  count = local.cloud_build ? 1 : 0

  project = var.project_id
  role    = "roles/logging.logWriter"
  member  = google_service_account.cloud_build[0].member
}

resource "google_cloud_run_v2_service_iam_member" "cloud_build_developer" {
  for_each = local.ci_services

  project  = var.project_id
  location = var.region
  name     = each.value
  role     = "roles/run.developer"
  member   = google_service_account.cloud_build[0].member
}

resource "google_cloud_run_v2_job_iam_member" "cloud_build_developer" {
  for_each = local.ci_jobs

  project  = var.project_id
  location = var.region
  name     = each.value
  role     = "roles/run.developer"
  member   = google_service_account.cloud_build[0].member
}

resource "google_service_account_iam_member" "cloud_build_act_as" {
  for_each = local.ci_act_as

  service_account_id = google_service_account.function[each.key].name
  role               = "roles/iam.serviceAccountUser"
  member             = google_service_account.cloud_build[0].member
}
