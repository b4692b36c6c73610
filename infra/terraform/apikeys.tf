# Optional API-key mode (var.api_keys), for callers that do not use Cloud Run IAM. The keys live
# in a Secret Manager secret; each HTTP function reads it as API_KEYS (comma-separated; two keys
# during a rotation); its batch path never sees it.
#
# One apply brings it up: Cloud Run refuses a revision whose secret reference has no version
# (and a secret cannot get a version before Terraform creates it: hashicorp/
# terraform-provider-google#10846), so Terraform writes the first version itself, one generated
# key, and the services are created after it. The key goes through secret_data_wo, a write-only
# argument (Terraform >= 1.11): sent to Secret Manager once (secret_data_wo_version), kept in
# neither the plan nor the state. Later keys are versions you add with gcloud.

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

# The first key: two UUIDs' hex digits (uuid() draws from a cryptographic source: 244 random bits
# in 64 characters). uuid() changes at every plan, which is harmless here: a write-only value is
# sent only when secret_data_wo_version changes, i.e. once.
resource "google_secret_manager_secret_version" "api_keys_initial" {
  count = var.api_keys.enabled ? 1 : 0

  secret                 = google_secret_manager_secret.api_keys[0].id
  secret_data_wo         = join("", [replace(uuid(), "-", ""), replace(uuid(), "-", "")])
  secret_data_wo_version = "1"

  # The functions may read "latest", which is a later version once you rotate: destroying this
  # one would only disable a retired key, so keep it rather than fail on a missing version.
  deletion_policy = "ABANDON"
}

# Readable by the HTTP functions' identities only, on this secret only.
resource "google_secret_manager_secret_iam_member" "api_keys" {
  for_each = var.api_keys.enabled ? var.functions : {}

  project   = var.project_id
  secret_id = google_secret_manager_secret.api_keys[0].secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = google_service_account.function[each.key].member
}
