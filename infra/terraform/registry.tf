# Artifact Registry repository for the function images (<function>:<tag>).

resource "google_artifact_registry_repository" "images" {
  #checkov:skip=CKV_GCP_84:Google-managed encryption; the images hold public packages and model weights, no secrets, and a customer key would add a KMS key ring to manage.
  project       = var.project_id
  location      = var.region
  repository_id = var.name_prefix
  format        = "DOCKER"
  description   = "Images of the AI functions (one per function, tagged by commit)."
  labels        = local.labels

  docker_config {
    # A tag names one build forever, so a service's image reference means what it meant at apply.
    immutable_tags = true
  }

  depends_on = [google_project_service.enabled]
}
