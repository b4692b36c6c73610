# Batch inference over Cloud Storage (the batch issue's entry points, same image as the HTTP
# function):
# - an event-driven service per function, `<function>_batch` as a CloudEvent function, triggered
#   by Eventarc on every object finalized in the batch bucket; the function itself keeps only
#   objects under its input prefix (Eventarc cannot filter Cloud Storage events by prefix), and
#   writes predictions under the output prefix, which is outside the input prefix;
# - a Cloud Run job per function for backlogs, sharded by CLOUD_RUN_TASK_INDEX/COUNT:
#   `gcloud run jobs execute <prefix>-<function>-batch --region <region>`.

locals {
  batch_functions = var.batch.enabled ? var.functions : {}

  batch_env = {
    for name, f in local.batch_functions : name => merge(local.env[name], {
      BATCH_INPUT_PREFIX  = "${var.batch.input_prefix}${name}/"
      BATCH_OUTPUT_PREFIX = "${var.batch.output_prefix}${name}/"
      BATCH_OUTPUT_BUCKET = google_storage_bucket.this["batch"].name
    })
  }

  batch_job_args = {
    for name, f in local.batch_functions : name => lookup(var.batch.job_args, name,
      ["python", "-m", "aifn.batch", "gs://${google_storage_bucket.this["batch"].name}/${var.batch.input_prefix}${name}/"]
    )
  }
}

# Read inputs, write predictions and error files: object read/write on the batch bucket only.
resource "google_storage_bucket_iam_member" "batch" {
  for_each = local.batch_functions

  bucket = google_storage_bucket.this["batch"].name
  role   = "roles/storage.objectUser"
  member = google_service_account.function["${each.key}-batch"].member
}

resource "google_cloud_run_v2_service" "batch" {
  for_each = local.batch_functions

  project             = var.project_id
  location            = var.region
  name                = "${var.name_prefix}-${each.key}-batch"
  description         = "AI function ${each.key}: batch files from Cloud Storage (Eventarc)"
  ingress             = "INGRESS_TRAFFIC_INTERNAL_ONLY" # only Eventarc (Pub/Sub push) calls it
  deletion_protection = var.deletion_protection
  labels              = local.labels

  invoker_iam_disabled = false

  template {
    service_account = google_service_account.function["${each.key}-batch"].email
    # One file per instance: a file is streamed through the model's batches by itself, so more
    # files mean more instances rather than several files fighting for one instance's vCPUs.
    max_instance_request_concurrency = 1
    timeout                          = "${var.batch.timeout_seconds}s"
    execution_environment            = "EXECUTION_ENVIRONMENT_GEN2"
    labels                           = local.labels

    scaling {
      min_instance_count = 0
      max_instance_count = var.batch.max_instances
    }

    vpc_access {
      egress = "PRIVATE_RANGES_ONLY"
      network_interfaces {
        network    = google_compute_network.vpc.id
        subnetwork = google_compute_subnetwork.run.id
      }
    }

    containers {
      image = local.images[each.key]

      ports {
        container_port = 8080
      }

      resources {
        limits = {
          cpu    = each.value.cpu
          memory = each.value.memory
        }
        cpu_idle          = true
        startup_cpu_boost = true
      }

      env {
        name  = "FUNCTION_TARGET"
        value = "${each.key}_batch"
      }
      env {
        name  = "FUNCTION_SIGNATURE_TYPE"
        value = "cloudevent"
      }

      dynamic "env" {
        for_each = local.batch_env[each.key]
        content {
          name  = env.key
          value = env.value
        }
      }

      dynamic "env" {
        for_each = var.redis.enabled ? [1] : []
        content {
          name = "REDIS_AUTH"
          value_source {
            secret_key_ref {
              secret  = google_secret_manager_secret.redis_auth[0].secret_id
              version = google_secret_manager_secret_version.redis_auth[0].version
            }
          }
        }
      }

      startup_probe {
        http_get {
          path = "/v1/health"
        }
        period_seconds    = 4
        timeout_seconds   = 2
        failure_threshold = 60
      }
    }
  }

  depends_on = [
    google_project_iam_member.function,
    google_secret_manager_secret_iam_member.redis_auth,
    google_storage_bucket_iam_member.batch,
  ]
}

resource "google_cloud_run_v2_job" "batch" {
  for_each = local.batch_functions

  project             = var.project_id
  location            = var.region
  name                = "${var.name_prefix}-${each.key}-job"
  deletion_protection = var.deletion_protection
  labels              = local.labels

  template {
    task_count  = var.batch.job_task_count
    parallelism = var.batch.job_parallelism
    labels      = local.labels

    template {
      service_account       = google_service_account.function["${each.key}-batch"].email
      timeout               = "${var.batch.job_timeout_seconds}s"
      max_retries           = 1
      execution_environment = "EXECUTION_ENVIRONMENT_GEN2"

      vpc_access {
        egress = "PRIVATE_RANGES_ONLY"
        network_interfaces {
          network    = google_compute_network.vpc.id
          subnetwork = google_compute_subnetwork.run.id
        }
      }

      containers {
        image   = local.images[each.key]
        command = lookup(var.batch.job_command, each.key, null)
        args    = local.batch_job_args[each.key]

        resources {
          limits = {
            cpu    = each.value.cpu
            memory = each.value.memory
          }
        }

        env {
          name  = "FUNCTION_TARGET"
          value = each.key
        }

        dynamic "env" {
          for_each = local.batch_env[each.key]
          content {
            name  = env.key
            value = env.value
          }
        }

        dynamic "env" {
          for_each = var.redis.enabled ? [1] : []
          content {
            name = "REDIS_AUTH"
            value_source {
              secret_key_ref {
                secret  = google_secret_manager_secret.redis_auth[0].secret_id
                version = google_secret_manager_secret_version.redis_auth[0].version
              }
            }
          }
        }
      }
    }
  }

  depends_on = [
    google_project_iam_member.function,
    google_secret_manager_secret_iam_member.redis_auth,
    google_storage_bucket_iam_member.batch,
  ]
}

# Eventarc: its own identity, allowed to receive events and to invoke the batch services only.
resource "google_service_account" "eventarc" {
  count = var.batch.enabled ? 1 : 0

  project      = var.project_id
  account_id   = "${var.name_prefix}-eventarc"
  display_name = "AI functions: Eventarc trigger of the batch services"

  depends_on = [google_project_service.enabled]
}

resource "google_project_iam_member" "eventarc_receiver" {
  count = var.batch.enabled ? 1 : 0

  project = var.project_id
  role    = "roles/eventarc.eventReceiver"
  member  = google_service_account.eventarc[0].member
}

resource "google_cloud_run_v2_service_iam_member" "eventarc_invoker" {
  for_each = local.batch_functions

  project  = var.project_id
  location = var.region
  name     = google_cloud_run_v2_service.batch[each.key].name
  role     = "roles/run.invoker"
  member   = google_service_account.eventarc[0].member
}

# Cloud Storage publishes its events to Pub/Sub as its own service agent.
data "google_storage_project_service_account" "gcs" {
  count = var.batch.enabled ? 1 : 0

  project    = var.project_id
  depends_on = [google_project_service.enabled]
}

resource "google_project_iam_member" "gcs_pubsub_publisher" {
  count = var.batch.enabled ? 1 : 0

  project = var.project_id
  role    = "roles/pubsub.publisher"
  member  = data.google_storage_project_service_account.gcs[0].member
}

resource "google_eventarc_trigger" "batch" {
  for_each = local.batch_functions

  project         = var.project_id
  location        = var.region
  name            = "${var.name_prefix}-${each.key}-batch"
  service_account = google_service_account.eventarc[0].email
  labels          = local.labels

  matching_criteria {
    attribute = "type"
    value     = "google.cloud.storage.object.v1.finalized"
  }
  matching_criteria {
    attribute = "bucket"
    value     = google_storage_bucket.this["batch"].name
  }

  destination {
    cloud_run_service {
      service = google_cloud_run_v2_service.batch[each.key].name
      region  = var.region
      path    = "/"
    }
  }

  depends_on = [
    google_project_iam_member.eventarc_receiver,
    google_project_iam_member.gcs_pubsub_publisher,
    google_cloud_run_v2_service_iam_member.eventarc_invoker,
  ]
}
