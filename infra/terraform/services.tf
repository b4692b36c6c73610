# The HTTP functions: one Cloud Run service per function, request-based autoscaling, private
# unless var.invokers / var.allow_unauthenticated say otherwise. This variant when Terraform owns
# the image (var.image_owner = "terraform", the default); refer to local.services for either.

resource "google_cloud_run_v2_service" "function" {
  for_each = var.image_owner == "terraform" ? var.functions : {}

  project             = var.project_id
  location            = var.region
  name                = "${var.name_prefix}-${each.key}"
  description         = "AI function ${each.key} (HTTP)"
  ingress             = var.ingress
  deletion_protection = var.deletion_protection
  labels              = local.labels

  # IAM decides who calls (roles/run.invoker); never switched off here.
  invoker_iam_disabled = false

  template {
    service_account                  = google_service_account.function[each.key].email
    max_instance_request_concurrency = each.value.concurrency
    timeout                          = "${each.value.request_timeout_seconds}s"
    execution_environment            = "EXECUTION_ENVIRONMENT_GEN2"
    labels                           = local.labels

    scaling {
      min_instance_count = each.value.min_instances
      max_instance_count = each.value.max_instances
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
        # CPU only while requests are in flight (request-based billing); the batcher has no
        # background work between requests. Extra CPU while the model loads and warms up.
        cpu_idle          = true
        startup_cpu_boost = true
      }

      env {
        name  = "FUNCTION_TARGET"
        value = each.key
      }

      dynamic "env" {
        for_each = local.http_env[each.key]
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

      dynamic "env" {
        for_each = var.api_keys.enabled ? [1] : []
        content {
          name = "API_KEYS"
          value_source {
            secret_key_ref {
              secret  = google_secret_manager_secret.api_keys[0].secret_id
              version = var.api_keys.secret_version
            }
          }
        }
      }

      # The model is loaded and warmed up before the port opens, so the first successful health
      # check means ready. Up to 240 s (Cloud Run's limit) for a cold image pull and model load.
      startup_probe {
        http_get {
          path = "/v1/health"
        }
        period_seconds    = 4
        timeout_seconds   = 2
        failure_threshold = 60
      }

      # Health is answered by a request thread while the model works, so a busy instance passes;
      # three misses in a row (90 s) mean a wedged process, which Cloud Run replaces.
      liveness_probe {
        http_get {
          path = "/v1/health"
        }
        period_seconds    = 30
        timeout_seconds   = 5
        failure_threshold = 3
      }
    }
  }

  depends_on = [
    google_project_iam_member.function,
    google_secret_manager_secret_iam_member.redis_auth,
    google_secret_manager_secret_iam_member.api_keys,
    google_secret_manager_secret_version.api_keys_initial,
    google_project_service.enabled,
  ]
}

# The same, when CI owns the image (var.image_owner = "ci"): lifecycle.ignore_changes cannot depend
# on a variable, so this is a second resource, identical but for for_each and lifecycle
# (tests/test_infra.py holds the two equal). README, "Who owns the running image".
resource "google_cloud_run_v2_service" "function_ci" {
  for_each = var.image_owner == "ci" ? var.functions : {}

  project             = var.project_id
  location            = var.region
  name                = "${var.name_prefix}-${each.key}"
  description         = "AI function ${each.key} (HTTP)"
  ingress             = var.ingress
  deletion_protection = var.deletion_protection
  labels              = local.labels

  # IAM decides who calls (roles/run.invoker); never switched off here.
  invoker_iam_disabled = false

  template {
    service_account                  = google_service_account.function[each.key].email
    max_instance_request_concurrency = each.value.concurrency
    timeout                          = "${each.value.request_timeout_seconds}s"
    execution_environment            = "EXECUTION_ENVIRONMENT_GEN2"
    labels                           = local.labels

    scaling {
      min_instance_count = each.value.min_instances
      max_instance_count = each.value.max_instances
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
        # CPU only while requests are in flight (request-based billing); the batcher has no
        # background work between requests. Extra CPU while the model loads and warms up.
        cpu_idle          = true
        startup_cpu_boost = true
      }

      env {
        name  = "FUNCTION_TARGET"
        value = each.key
      }

      dynamic "env" {
        for_each = local.http_env[each.key]
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

      dynamic "env" {
        for_each = var.api_keys.enabled ? [1] : []
        content {
          name = "API_KEYS"
          value_source {
            secret_key_ref {
              secret  = google_secret_manager_secret.api_keys[0].secret_id
              version = var.api_keys.secret_version
            }
          }
        }
      }

      # The model is loaded and warmed up before the port opens, so the first successful health
      # check means ready. Up to 240 s (Cloud Run's limit) for a cold image pull and model load.
      startup_probe {
        http_get {
          path = "/v1/health"
        }
        period_seconds    = 4
        timeout_seconds   = 2
        failure_threshold = 60
      }

      # Health is answered by a request thread while the model works, so a busy instance passes;
      # three misses in a row (90 s) mean a wedged process, which Cloud Run replaces.
      liveness_probe {
        http_get {
          path = "/v1/health"
        }
        period_seconds    = 30
        timeout_seconds   = 5
        failure_threshold = 3
      }
    }
  }

  depends_on = [
    google_project_iam_member.function,
    google_secret_manager_secret_iam_member.redis_auth,
    google_secret_manager_secret_iam_member.api_keys,
    google_secret_manager_secret_version.api_keys_initial,
    google_project_service.enabled,
  ]
  # CI owns the image (var.image_owner = "ci"): cloudbuild.yaml's `gcloud run ... update --image`
  # changes it, and the client fields gcloud stamps; Terraform keeps everything else.
  lifecycle {
    ignore_changes = [template[0].containers[0].image, template[0].revision, client, client_version]
  }
}
