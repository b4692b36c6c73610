# Batch inference over Cloud Storage (the batch issue's entry points, same image as the HTTP
# function), two buckets per function (storage.tf): <function>-in for inputs, <function>-out for
# predictions and errors files.
# - an event-driven service per function, `<function>_batch` as a CloudEvent function, triggered
#   by Eventarc on objects finalized in that function's input bucket only. Its outputs go to the
#   output bucket, which no trigger watches, so writing them never fires an event (before, one
#   shared bucket sent every output file to both functions: two wasted invocations per file);
# - a Cloud Run job per function for backlogs, sharded by CLOUD_RUN_TASK_INDEX/COUNT:
#   `gcloud run jobs execute <prefix>-<function>-job --region <region>`.
# Delivery: Eventarc redelivers through its Pub/Sub subscription; an event still failing after
# batch.dead_letter_max_attempts goes to a dead-letter topic kept for inspection (below).

locals {
  batch_functions = var.batch.enabled ? var.functions : {}

  batch_env = {
    for name, f in local.batch_functions : name => merge(local.env[name], {
      BATCH_INPUT_PREFIX  = var.batch.input_prefix
      BATCH_OUTPUT_PREFIX = var.batch.output_prefix
      BATCH_OUTPUT_BUCKET = google_storage_bucket.this["${name}-out"].name
    })
  }

  batch_job_args = {
    for name, f in local.batch_functions : name => lookup(var.batch.job_args, name,
      ["python", "-m", "aifn.files", "gs://${google_storage_bucket.this["${name}-in"].name}/${var.batch.input_prefix}"]
    )
  }
}

# Each function's batch identity reads (and lists) its own inputs and nothing else: it cannot
# delete or overwrite an input, nor read another function's files.
resource "google_storage_bucket_iam_member" "batch_inputs" {
  for_each = local.batch_functions

  bucket = google_storage_bucket.this["${each.key}-in"].name
  role   = "roles/storage.objectViewer"
  member = google_service_account.function["${each.key}-batch"].member
}

# ... and writes (creates, overwrites, deletes: a job merges and removes its part files) its
# own outputs only.
resource "google_storage_bucket_iam_member" "batch_outputs" {
  for_each = local.batch_functions

  bucket = google_storage_bucket.this["${each.key}-out"].name
  role   = "roles/storage.objectUser"
  member = google_service_account.function["${each.key}-batch"].member
}

resource "google_cloud_run_v2_service" "batch" {
  for_each = var.image_owner == "terraform" ? local.batch_functions : {}

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
    google_storage_bucket_iam_member.batch_inputs,
    google_storage_bucket_iam_member.batch_outputs,
  ]
}

# The same, when CI owns the image (var.image_owner = "ci"): lifecycle.ignore_changes cannot depend
# on a variable, so this is a second resource, identical but for for_each and lifecycle
# (tests/test_infra.py holds the two equal). README, "Who owns the running image".
resource "google_cloud_run_v2_service" "batch_ci" {
  for_each = var.image_owner == "ci" ? local.batch_functions : {}

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
    google_storage_bucket_iam_member.batch_inputs,
    google_storage_bucket_iam_member.batch_outputs,
  ]
  # CI owns the image (var.image_owner = "ci"): cloudbuild.yaml's `gcloud run ... update --image`
  # changes it, and the client fields gcloud stamps; Terraform keeps everything else.
  lifecycle {
    ignore_changes = [template[0].containers[0].image, template[0].revision, client, client_version]
  }
}

resource "google_cloud_run_v2_job" "batch" {
  for_each = var.image_owner == "terraform" ? local.batch_functions : {}

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
    google_storage_bucket_iam_member.batch_inputs,
    google_storage_bucket_iam_member.batch_outputs,
  ]
}

# The same, when CI owns the image (var.image_owner = "ci"): lifecycle.ignore_changes cannot depend
# on a variable, so this is a second resource, identical but for for_each and lifecycle
# (tests/test_infra.py holds the two equal). README, "Who owns the running image".
resource "google_cloud_run_v2_job" "batch_ci" {
  for_each = var.image_owner == "ci" ? local.batch_functions : {}

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
    google_storage_bucket_iam_member.batch_inputs,
    google_storage_bucket_iam_member.batch_outputs,
  ]
  # CI owns the image (var.image_owner = "ci"): cloudbuild.yaml's `gcloud run ... update --image`
  # changes it, and the client fields gcloud stamps; Terraform keeps everything else.
  lifecycle {
    ignore_changes = [template[0].template[0].containers[0].image, client, client_version]
  }
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
  name     = local.batch_services[each.key].name
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

# The Eventarc service agent must hold roles/eventarc.serviceAgent before a trigger can be created.
# Google grants it when the API is enabled, but on a new project the agent may not exist yet or
# its permission may not have propagated: the first apply then fails with "Permission denied
# while using the Eventarc Service Agent ... it may take a few minutes" (hashicorp/
# terraform-provider-google#14584). The agent is created on demand by
# `gcloud beta services identity create --service=eventarc.googleapis.com` (make deploy's first
# stage does it; google_project_service_identity, its Terraform form, exists only in the
# google-beta provider), granted here explicitly, and the triggers wait below.
resource "google_project_iam_member" "eventarc_agent" {
  #checkov:skip=CKV_GCP_49:The member is Google's own Eventarc service agent, and roles/eventarc.serviceAgent is the role Google grants it when the API is enabled (it mints tokens for triggers' service accounts); this re-asserts that grant, it gives nothing to a principal of ours.
  count = var.batch.enabled ? 1 : 0

  project = var.project_id
  role    = "roles/eventarc.serviceAgent"
  member  = local.service_agents.eventarc
}

# The propagation wait, as Google's samples do with time_sleep (hashicorp/time): terraform_data
# and a local `sleep` need no further provider, so `make infra-check` checks it offline. It runs
# when the grants it depends on are created or replaced, never on a no-op apply.
resource "terraform_data" "eventarc_iam_propagation" {
  count = var.batch.enabled ? 1 : 0

  triggers_replace = [
    google_project_iam_member.eventarc_agent[0].id,
    google_project_iam_member.eventarc_receiver[0].id,
    google_project_iam_member.gcs_pubsub_publisher[0].id,
  ]
  input = var.iam_propagation_wait_seconds

  provisioner "local-exec" {
    command = "sleep ${var.iam_propagation_wait_seconds}"
  }
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
  # This function's input bucket only: outputs (another bucket) and other functions' inputs
  # never reach it.
  matching_criteria {
    attribute = "bucket"
    value     = google_storage_bucket.this["${each.key}-in"].name
  }

  destination {
    cloud_run_service {
      service = local.batch_services[each.key].name
      region  = var.region
      path    = "/"
    }
  }

  # Eventarc's own setting for Cloud Run destinations: max_attempts accepts only 1 (no retry).
  # Retries (on by default) and the dead-letter topic live on the Pub/Sub subscription Eventarc
  # creates for the trigger (below).
  dynamic "retry_policy" {
    for_each = var.batch.retry ? [] : [1]
    content {
      max_attempts = 1
    }
  }

  depends_on = [
    google_project_iam_member.eventarc_receiver,
    google_project_iam_member.gcs_pubsub_publisher,
    google_cloud_run_v2_service_iam_member.eventarc_invoker,
    terraform_data.eventarc_iam_propagation,
  ]
}

# Dead letters. Eventarc delivers through a Pub/Sub subscription it creates and owns
# (transport[0].pubsub[0].subscription, "eventarc-<region>-<trigger>-sub-NNN"): its retry and
# retention settings are that subscription's, and Google documents changing them there
# (cloud.google.com/eventarc/docs/retry-events). Terraform cannot manage a subscription it did
# not create (nor take a grant on it before it exists, at plan time), so it creates the
# dead-letter topic, a subscription that keeps dead letters for 7 days, and the Pub/Sub service
# agent's right to publish to the topic. The trigger's subscription gets its dead-letter policy
# and the agent's subscriber role from the two gcloud commands in the output batch_dead_letter,
# which `make deploy` runs after the apply (run them yourself after a plain `terraform apply`).
resource "google_pubsub_topic" "dead_letter" {
  #checkov:skip=CKV_GCP_83:Google-managed encryption; the messages are Cloud Storage event payloads (bucket and object names), and a customer key would add a KMS key ring to manage.
  for_each = local.batch_functions

  project                    = var.project_id
  name                       = "${var.name_prefix}-${each.key}-batch-dead-letter"
  labels                     = local.labels
  message_retention_duration = "604800s"

  depends_on = [google_project_service.enabled]
}

resource "google_pubsub_subscription" "dead_letter" {
  for_each = local.batch_functions

  project                    = var.project_id
  name                       = "${var.name_prefix}-${each.key}-batch-dead-letter"
  topic                      = google_pubsub_topic.dead_letter[each.key].id
  labels                     = local.labels
  message_retention_duration = "604800s"
  ack_deadline_seconds       = 60

  expiration_policy {
    ttl = "" # never expires for inactivity
  }
}

resource "google_pubsub_topic_iam_member" "dead_letter_publisher" {
  for_each = local.batch_functions

  project = var.project_id
  topic   = google_pubsub_topic.dead_letter[each.key].name
  role    = "roles/pubsub.publisher"
  member  = local.service_agents.pubsub
}
