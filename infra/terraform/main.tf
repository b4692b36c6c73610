# What every file shares: the images, the functions' environment, and the APIs.

locals {
  labels = merge(var.labels, { app = "aifn", managed-by = "terraform" })

  registry = "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
  images = {
    for name, f in var.functions : name => coalesce(f.image, "${local.registry}/${name}:${coalesce(var.image_tag, "unset")}")
  }

  # Settings computed from the Cloud Run sizing, so that batching and backpressure match it:
  # one gunicorn worker (one model copy) with a thread per request Cloud Run may send, a model
  # worker per vCPU (one ONNX Runtime intra-op thread each), and a queue that holds what a full
  # instance's requests typically carry.
  tuned_env = {
    for name, f in var.functions : name => {
      WORKERS                 = "1"
      THREADS                 = tostring(f.concurrency)
      MODEL_WORKERS           = f.cpu
      INTRA_OP_THREADS        = "1"
      MAX_QUEUED_TEXTS        = tostring(f.concurrency * f.texts_per_request)
      REQUEST_TIMEOUT_SECONDS = tostring(f.model_timeout_seconds)
    }
  }

  # Memorystore as the cache issue expects it: host, TLS port, and every server CA (public, PEM
  # text); the AUTH string is a Secret Manager reference added in the container's env blocks.
  # During a server CA rotation Memorystore lists two CAs (the old and the new) and the server
  # may present a certificate from either, so the bundle carries all of them
  # (https://cloud.google.com/memorystore/docs/redis/about-in-transit-encryption#certificate_authority_rotation).
  redis_env = var.redis.enabled ? {
    REDIS_HOST    = google_redis_instance.cache[0].host
    REDIS_PORT    = tostring(google_redis_instance.cache[0].port)
    REDIS_CA_CERT = join("\n", google_redis_instance.cache[0].server_ca_certs[*].cert)
  } : {}

  env = {
    for name, f in var.functions : name => merge(
      local.tuned_env[name],
      f.env,
      local.redis_env,
      { GOOGLE_CLOUD_PROJECT = var.project_id },
    )
  }

  # The HTTP services only (README, Security): rate limits, and whether the caller's ID token can
  # be trusted, which it can only when IAM guards the service. A function's env may set its own
  # RATE_LIMIT; API_KEYS is a secret reference in services.tf.
  http_env = {
    for name, f in var.functions : name => merge(
      {
        IAM_REQUIRED       = tostring(!var.allow_unauthenticated)
        FORWARDED_FOR_HOPS = tostring(var.forwarded_for_hops)
      },
      var.rate_limit == null ? {} : { RATE_LIMIT = var.rate_limit },
      local.env[name],
    )
  }

  # The services and jobs, whichever variant owns their image (services.tf, batch.tf): refer to
  # these rather than to one variant.
  services       = merge(google_cloud_run_v2_service.function, google_cloud_run_v2_service.function_ci)
  batch_services = merge(google_cloud_run_v2_service.batch, google_cloud_run_v2_service.batch_ci)
  batch_jobs     = merge(google_cloud_run_v2_job.batch, google_cloud_run_v2_job.batch_ci)

  # Google-managed service agents (named by the project number) that the batch path relies on.
  project_number = data.google_project.this.number
  service_agents = {
    eventarc = "serviceAccount:service-${local.project_number}@gcp-sa-eventarc.iam.gserviceaccount.com"
    pubsub   = "serviceAccount:service-${local.project_number}@gcp-sa-pubsub.iam.gserviceaccount.com"
  }

  apis = toset([
    "artifactregistry.googleapis.com",
    "cloudbuild.googleapis.com",
    "cloudresourcemanager.googleapis.com",
    "compute.googleapis.com",
    "eventarc.googleapis.com",
    "iam.googleapis.com",
    "logging.googleapis.com",
    "monitoring.googleapis.com",
    "pubsub.googleapis.com",
    "redis.googleapis.com",
    "run.googleapis.com",
    "secretmanager.googleapis.com",
    "storage.googleapis.com",
  ])
}

resource "google_project_service" "enabled" {
  for_each = var.enable_apis ? local.apis : toset([])

  project            = var.project_id
  service            = each.value
  disable_on_destroy = false
}

data "google_project" "this" {
  project_id = var.project_id

  depends_on = [google_project_service.enabled]
}
