# Optional API-key mode (var.api_keys), for callers that do not use Cloud Run IAM. The keys live
# in a Secret Manager secret that Terraform creates empty: you add versions with gcloud, so key
# values never pass through Terraform or its state. Each HTTP function reads the secret as
# API_KEYS (comma-separated; two keys during a rotation); its batch path never sees it.

resource "google_secret_manager_secret" "api_keys" {
  count = var.api_keys.enabled ? 1 : 0

  project   = var.project_id
  secret_id = "${var.name_prefix}-api-keys"
  labels    = local.labels

  replication {
    user_managed {
      replicas {
        location = var.region
      }
    }
  }

  depends_on = [google_project_service.enabled]
}

# Readable by the HTTP functions' identities only, on this secret only.
resource "google_secret_manager_secret_iam_member" "api_keys" {
  for_each = var.api_keys.enabled ? var.functions : {}

  project   = var.project_id
  secret_id = google_secret_manager_secret.api_keys[0].secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = google_service_account.function[each.key].member
}
