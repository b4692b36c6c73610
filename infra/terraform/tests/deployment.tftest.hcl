# What one `terraform apply` with the defaults creates, planned and applied against a mocked
# google provider whose schema is the real one (see README, "Checked offline").

mock_provider "google" {
  mock_resource "google_redis_instance" {
    defaults = {
      host            = "10.9.0.3"
      port            = 6378
      auth_string     = "mock-auth-string"
      server_ca_certs = [{ cert = "-----BEGIN CERTIFICATE-----\nMOCK\n-----END CERTIFICATE-----\n", create_time = "", expire_time = "", serial_number = "1", sha1_fingerprint = "" }]
    }
  }
  mock_resource "google_service_account" {
    defaults = {
      email  = "mock@example-project.iam.gserviceaccount.com"
      member = "serviceAccount:mock@example-project.iam.gserviceaccount.com"
    }
  }
  mock_resource "google_compute_network" {
    defaults = { id = "projects/example-project/global/networks/aifn-vpc" }
  }
  mock_resource "google_compute_subnetwork" {
    defaults = { id = "projects/example-project/regions/europe-west1/subnetworks/aifn-run" }
  }
  mock_resource "google_secret_manager_secret_version" {
    defaults = { version = "1" }
  }
  mock_data "google_storage_project_service_account" {
    defaults = { member = "serviceAccount:service-123@gs-project-accounts.iam.gserviceaccount.com" }
  }
}

variables {
  project_id = "example-project"
  image_tag  = "c0ffee1"
  # The IAM propagation wait (a local sleep before the Eventarc triggers) is for real projects.
  iam_propagation_wait_seconds = 0
}

run "private_by_default" {
  command = apply

  assert {
    condition     = length(google_cloud_run_v2_service_iam_member.invoker) == 0
    error_message = "With no invokers and allow_unauthenticated unset, no one may be granted roles/run.invoker on the functions."
  }
  assert {
    condition     = alltrue([for s in google_cloud_run_v2_service.function : s.invoker_iam_disabled == false])
    error_message = "The invoker IAM check must stay on for every function."
  }
  assert {
    condition     = alltrue([for s in google_cloud_run_v2_service.batch : s.ingress == "INGRESS_TRAFFIC_INTERNAL_ONLY" && s.invoker_iam_disabled == false])
    error_message = "Batch services must be internal-only and IAM-checked."
  }
  assert {
    condition     = alltrue([for m in google_cloud_run_v2_service_iam_member.eventarc_invoker : m.member == google_service_account.eventarc[0].member && m.role == "roles/run.invoker"])
    error_message = "Only Eventarc's own service account may invoke the batch services."
  }
}

run "one_service_per_function" {
  command = plan

  assert {
    condition     = toset(keys(google_cloud_run_v2_service.function)) == toset(["sentiment", "classify"])
    error_message = "Expected a Cloud Run service for each of sentiment and classify."
  }
  assert {
    condition     = google_cloud_run_v2_service.function["sentiment"].template[0].containers[0].image == "europe-west1-docker.pkg.dev/example-project/aifn/sentiment:c0ffee1"
    error_message = "The image must come from the repository and image_tag."
  }
  assert {
    condition     = one([for e in google_cloud_run_v2_service.function["classify"].template[0].containers[0].env : e.value if e.name == "FUNCTION_TARGET"]) == "classify"
    error_message = "Each service must run its own entry point."
  }
}

run "sized_for_the_model" {
  command = plan

  assert {
    condition = alltrue([for s in google_cloud_run_v2_service.function :
      s.template[0].containers[0].resources[0].limits.cpu == "2" &&
      s.template[0].containers[0].resources[0].limits.memory == "2Gi" &&
      s.template[0].containers[0].resources[0].startup_cpu_boost == true
    ])
    error_message = "Defaults: 2 vCPU, 2 GiB, startup CPU boost."
  }
  assert {
    condition = alltrue([for s in google_cloud_run_v2_service.function :
      s.template[0].max_instance_request_concurrency == 32 &&
      s.template[0].scaling[0].min_instance_count == 0 &&
      s.template[0].scaling[0].max_instance_count == 10 &&
      s.template[0].timeout == "60s"
    ])
    error_message = "Defaults: concurrency 32, 0-10 instances, 60 s request timeout."
  }
  assert {
    condition = alltrue([for s in google_cloud_run_v2_service.function :
      one([for e in s.template[0].containers[0].env : e.value if e.name == "MAX_QUEUED_TEXTS"]) == "256" &&
      one([for e in s.template[0].containers[0].env : e.value if e.name == "THREADS"]) == "32" &&
      one([for e in s.template[0].containers[0].env : e.value if e.name == "MODEL_WORKERS"]) == "2" &&
      one([for e in s.template[0].containers[0].env : e.value if e.name == "INTRA_OP_THREADS"]) == "1" &&
      one([for e in s.template[0].containers[0].env : e.value if e.name == "REQUEST_TIMEOUT_SECONDS"]) == "30"
    ])
    error_message = "Defaults: queue 32 x 8 = 256 texts, a thread per concurrent request, a model worker per vCPU, 30 s model deadline."
  }
}

run "probes_on_health" {
  command = plan

  assert {
    condition = alltrue([for s in google_cloud_run_v2_service.function :
      s.template[0].containers[0].startup_probe[0].http_get[0].path == "/v1/health" &&
      s.template[0].containers[0].liveness_probe[0].http_get[0].path == "/v1/health"
    ])
    error_message = "Startup and liveness probes must check /v1/health."
  }
  assert {
    condition = alltrue([for s in google_cloud_run_v2_service.function :
      s.template[0].containers[0].startup_probe[0].period_seconds * s.template[0].containers[0].startup_probe[0].failure_threshold <= 240
    ])
    error_message = "Cloud Run allows a startup probe at most 240 s."
  }
  assert {
    condition     = alltrue([for s in google_cloud_run_v2_service.batch : s.template[0].containers[0].startup_probe[0].http_get[0].path == "/v1/health"])
    error_message = "Batch services must have the startup probe too."
  }
}

run "redis_private_auth_tls" {
  command = apply

  assert {
    condition     = google_redis_instance.cache[0].auth_enabled && google_redis_instance.cache[0].transit_encryption_mode == "SERVER_AUTHENTICATION"
    error_message = "Memorystore must require AUTH and TLS."
  }
  assert {
    condition     = google_redis_instance.cache[0].authorized_network == google_compute_network.vpc.id && google_redis_instance.cache[0].connect_mode == "DIRECT_PEERING"
    error_message = "Memorystore must be attached to the deployment's VPC only."
  }
  assert {
    condition = alltrue([for s in concat(values(google_cloud_run_v2_service.function), values(google_cloud_run_v2_service.batch)) :
      s.template[0].vpc_access[0].egress == "PRIVATE_RANGES_ONLY" &&
      s.template[0].vpc_access[0].network_interfaces[0].subnetwork == google_compute_subnetwork.run.id
    ])
    error_message = "Every service must reach private ranges (Redis) through Direct VPC egress."
  }
  assert {
    condition = alltrue([for s in google_cloud_run_v2_service.function :
      one([for e in s.template[0].containers[0].env : e.value if e.name == "REDIS_HOST"]) == "10.9.0.3" &&
      one([for e in s.template[0].containers[0].env : e.value if e.name == "REDIS_PORT"]) == "6378" &&
      startswith(one([for e in s.template[0].containers[0].env : e.value if e.name == "REDIS_CA_CERT"]), "-----BEGIN CERTIFICATE-----")
    ])
    error_message = "Functions must get Memorystore's host, TLS port and CA certificate."
  }
  assert {
    condition = alltrue([for s in google_cloud_run_v2_service.function :
      one([for e in s.template[0].containers[0].env : e.value_source[0].secret_key_ref[0].secret if e.name == "REDIS_AUTH"]) == google_secret_manager_secret.redis_auth[0].secret_id &&
      one([for e in s.template[0].containers[0].env : e.value if e.name == "REDIS_AUTH"]) == null
    ])
    error_message = "REDIS_AUTH must come from Secret Manager, never as a plain value."
  }
  assert {
    condition     = google_secret_manager_secret_version.redis_auth[0].secret_data == "mock-auth-string"
    error_message = "The secret must hold the instance's AUTH string."
  }
}

run "one_identity_per_function" {
  command = plan

  assert {
    condition     = toset(keys(google_service_account.function)) == toset(["sentiment", "classify", "sentiment-batch", "classify-batch"])
    error_message = "Each function needs its own service account for HTTP and for batch."
  }
  assert {
    condition     = google_service_account.function["sentiment"].account_id == "aifn-sentiment" && google_service_account.function["classify-batch"].account_id == "aifn-classify-batch"
    error_message = "Service account ids are <prefix>-<function>[-batch]."
  }
  assert {
    condition     = toset([for m in google_project_iam_member.function : m.role]) == toset(["roles/logging.logWriter", "roles/monitoring.metricWriter"])
    error_message = "The functions' identities may get no project role beyond writing logs and metrics."
  }
  assert {
    condition     = alltrue([for m in google_secret_manager_secret_iam_member.redis_auth : m.role == "roles/secretmanager.secretAccessor"]) && length(google_secret_manager_secret_iam_member.redis_auth) == 4
    error_message = "Each identity reads the Redis AUTH secret, on that secret only."
  }
  assert {
    condition = (alltrue([for m in google_storage_bucket_iam_member.batch_inputs : m.role == "roles/storage.objectViewer"]) &&
      alltrue([for m in google_storage_bucket_iam_member.batch_outputs : m.role == "roles/storage.objectUser"]) &&
    toset(keys(google_storage_bucket_iam_member.batch_inputs)) == toset(["sentiment", "classify"]))
    error_message = "Only the batch identities get object access: read on their inputs, read/write on their outputs."
  }
}

run "identities_are_wired" {
  command = apply

  assert {
    condition = (google_cloud_run_v2_service.function["sentiment"].template[0].service_account == google_service_account.function["sentiment"].email &&
    google_cloud_run_v2_job.batch["classify"].template[0].template[0].service_account == google_service_account.function["classify-batch"].email)
    error_message = "Services and jobs must run as their own service accounts."
  }
  assert {
    condition = alltrue([for name, m in google_storage_bucket_iam_member.batch_inputs :
      m.bucket == google_storage_bucket.this["${name}-in"].name &&
      m.member == google_service_account.function["${name}-batch"].member &&
      google_storage_bucket_iam_member.batch_outputs[name].bucket == google_storage_bucket.this["${name}-out"].name &&
      google_storage_bucket_iam_member.batch_outputs[name].member == google_service_account.function["${name}-batch"].member
    ])
    error_message = "Each function's batch identity gets its own input and output buckets only."
  }
}

run "buckets_locked_down" {
  command = plan

  assert {
    condition = alltrue([for b in google_storage_bucket.this :
      b.uniform_bucket_level_access == true && b.public_access_prevention == "enforced"
    ])
    error_message = "Every bucket needs uniform bucket-level access and enforced public access prevention."
  }
  assert {
    condition     = toset(keys(google_storage_bucket.this)) == toset(["models", "sentiment-in", "sentiment-out", "classify-in", "classify-out"])
    error_message = "Expected the models bucket and an input and an output bucket per function."
  }
  assert {
    condition     = length(google_storage_bucket_iam_member.model_readers) == 0
    error_message = "No one reads the models bucket unless model_readers says so."
  }
}

run "batch_wiring" {
  command = apply

  assert {
    condition = alltrue([for name, s in google_cloud_run_v2_service.batch :
      one([for e in s.template[0].containers[0].env : e.value if e.name == "FUNCTION_TARGET"]) == "${name}_batch" &&
      one([for e in s.template[0].containers[0].env : e.value if e.name == "FUNCTION_SIGNATURE_TYPE"]) == "cloudevent" &&
      one([for e in s.template[0].containers[0].env : e.value if e.name == "BATCH_INPUT_PREFIX"]) == "inputs/" &&
      one([for e in s.template[0].containers[0].env : e.value if e.name == "BATCH_OUTPUT_PREFIX"]) == "predictions/" &&
      one([for e in s.template[0].containers[0].env : e.value if e.name == "BATCH_OUTPUT_BUCKET"]) == google_storage_bucket.this["${name}-out"].name &&
      s.template[0].containers[0].image == google_cloud_run_v2_service.function[name].template[0].containers[0].image
    ])
    error_message = "Each batch service runs the function's image as <function>_batch, a CloudEvent function, writing to its own output bucket."
  }
  assert {
    condition = alltrue([for name, t in google_eventarc_trigger.batch :
      contains([for c in t.matching_criteria : "${c.attribute}=${c.value}"], "type=google.cloud.storage.object.v1.finalized") &&
      contains([for c in t.matching_criteria : "${c.attribute}=${c.value}"], "bucket=${google_storage_bucket.this["${name}-in"].name}") &&
      t.destination[0].cloud_run_service[0].service == google_cloud_run_v2_service.batch[name].name &&
      t.service_account == google_service_account.eventarc[0].email
    ])
    error_message = "Each trigger sends its own input bucket's finalized objects to its batch service as Eventarc's identity."
  }
  assert {
    condition     = google_project_iam_member.gcs_pubsub_publisher[0].role == "roles/pubsub.publisher" && google_project_iam_member.gcs_pubsub_publisher[0].member == "serviceAccount:service-123@gs-project-accounts.iam.gserviceaccount.com"
    error_message = "The Cloud Storage service agent must be able to publish events."
  }
  assert {
    condition = alltrue([for name, j in google_cloud_run_v2_job.batch :
      j.template[0].task_count == 4 &&
      j.template[0].template[0].containers[0].args == tolist(["python", "-m", "aifn.files", "gs://${google_storage_bucket.this["${name}-in"].name}/inputs/"])
    ])
    error_message = "Each job runs python -m aifn.files over its function's input prefix in 4 tasks."
  }
}

run "every_memorystore_ca_is_trusted" {
  # A CA rotation: Memorystore lists the old and the new server CA; a certificate from either
  # must verify, so the functions get both (the first alone broke TLS mid-rotation). A state of
  # its own, so the instance is created with the overridden CAs rather than kept from the runs
  # above.
  command   = apply
  state_key = "ca_rotation"

  override_resource {
    target = google_redis_instance.cache[0]
    values = {
      host = "10.9.0.3"
      port = 6378
      server_ca_certs = [
        { cert = "-----BEGIN CERTIFICATE-----\nOLD\n-----END CERTIFICATE-----\n", create_time = "", expire_time = "", serial_number = "1", sha1_fingerprint = "" },
        { cert = "-----BEGIN CERTIFICATE-----\nNEW\n-----END CERTIFICATE-----\n", create_time = "", expire_time = "", serial_number = "2", sha1_fingerprint = "" },
      ]
    }
  }

  assert {
    condition = alltrue([for s in google_cloud_run_v2_service.function :
      strcontains(one([for e in s.template[0].containers[0].env : e.value if e.name == "REDIS_CA_CERT"]), "OLD") &&
      strcontains(one([for e in s.template[0].containers[0].env : e.value if e.name == "REDIS_CA_CERT"]), "NEW")
    ])
    error_message = "Functions must trust every Memorystore server CA, not only the first."
  }
}
