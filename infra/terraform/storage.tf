# Buckets: models (artifacts of `make train` and model sources for the image build) and batch
# (input files and predictions). Both private: uniform bucket-level access (no object ACLs) and
# public access prevention enforced, whatever IAM is granted later.

locals {
  buckets = {
    models = {
      name        = "${var.project_id}-${var.name_prefix}-models"
      versioning  = true
      retain_days = 0
    }
    batch = {
      name        = "${var.project_id}-${var.name_prefix}-batch"
      versioning  = false
      retain_days = var.batch.retention_days
    }
  }
}

resource "google_storage_bucket" "this" {
  for_each = local.buckets

  project  = var.project_id
  name     = each.value.name
  location = upper(var.region) # single region: Eventarc triggers must be in the bucket's region
  labels   = local.labels

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.force_destroy_buckets

  versioning {
    enabled = each.value.versioning
  }

  dynamic "lifecycle_rule" {
    for_each = each.value.retain_days > 0 ? [each.value.retain_days] : []
    content {
      condition {
        age = lifecycle_rule.value
      }
      action {
        type = "Delete"
      }
    }
  }

  depends_on = [google_project_service.enabled]
}

resource "google_storage_bucket_iam_member" "model_readers" {
  for_each = toset(var.model_readers)

  bucket = google_storage_bucket.this["models"].name
  role   = "roles/storage.objectViewer"
  member = each.value
}
