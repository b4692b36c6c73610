# Buckets: models (artifacts of `make train` and model sources for the image build) and, per
# function with batch on, <function>-in (input files; its Eventarc trigger watches it) and
# <function>-out (predictions and errors files; nothing watches it, so writing an output never
# triggers anything). All private: uniform bucket-level access (no object ACLs) and public access
# prevention enforced, whatever IAM is granted later. Access is granted per bucket (batch.tf), so
# one function's identity never reads, overwrites or deletes another's files.

locals {
  buckets = merge(
    {
      models = {
        name        = "${var.project_id}-${var.name_prefix}-models"
        retain_days = 0
      }
    },
    { for name in keys(local.batch_functions) : "${name}-in" => {
      name        = "${var.project_id}-${var.name_prefix}-${name}-in"
      retain_days = var.batch.retention_days
    } },
    { for name in keys(local.batch_functions) : "${name}-out" => {
      name        = "${var.project_id}-${var.name_prefix}-${name}-out"
      retain_days = var.batch.retention_days
    } },
  )
}

# Encryption at rest with Google-managed keys: a customer-managed key would add a KMS key ring
# and its IAM to a deployment whose objects are public model weights and the user's own files.
#trivy:ignore:AVD-GCP-0066
resource "google_storage_bucket" "this" {
  #checkov:skip=CKV_GCP_62:Usage-log buckets are legacy; enable Data Access audit logs for storage.googleapis.com to record object reads.
  for_each = local.buckets

  project  = var.project_id
  name     = each.value.name
  location = upper(var.region) # single region: Eventarc triggers must be in the bucket's region
  labels   = local.labels

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.force_destroy_buckets

  # An overwritten or deleted object (a model, an input, a prediction rewritten by a redelivered
  # event) stays recoverable for a week as a noncurrent version.
  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = 7
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
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

# Where `gcloud builds submit --gcs-source-staging-dir=gs://<this>/source` uploads the source
# (make deploy does): Cloud Build fetches it as the build's own service account, which may read
# this bucket only, instead of the project-wide <project>_cloudbuild bucket gcloud would create.
# Sources are kept a week.
#trivy:ignore:AVD-GCP-0066
resource "google_storage_bucket" "build_sources" {
  #checkov:skip=CKV_GCP_62:Usage-log buckets are legacy; enable Data Access audit logs for storage.googleapis.com to record object reads.
  count = local.cloud_build ? 1 : 0

  project  = var.project_id
  name     = "${var.project_id}-${var.name_prefix}-build-src"
  location = upper(var.region)
  labels   = local.labels

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = true # uploaded sources only, recreated by every build

  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      age = 7
    }
    action {
      type = "Delete"
    }
  }
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = 1
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.enabled]
}

resource "google_storage_bucket_iam_member" "build_sources" {
  count = local.cloud_build ? 1 : 0

  bucket = google_storage_bucket.build_sources[0].name
  role   = "roles/storage.objectViewer"
  member = google_service_account.cloud_build[0].member
}
