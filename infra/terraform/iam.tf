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
  name     = google_cloud_run_v2_service.function[each.value.function].name
  role     = "roles/run.invoker"
  member   = each.value.member
}
