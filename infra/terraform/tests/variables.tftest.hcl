# The variables steer the deployment (scaling, concurrency, callers, optional parts), and the
# validation blocks stop values the provider would only reject at apply time.

mock_provider "google" {
  mock_resource "google_redis_instance" {
    defaults = {
      host            = "10.9.0.3"
      port            = 6378
      server_ca_certs = [{ cert = "PEM", create_time = "", expire_time = "", serial_number = "1", sha1_fingerprint = "" }]
    }
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

run "scaling_and_concurrency_follow_the_variables" {
  command = plan

  variables {
    functions = {
      sentiment = { min_instances = 1, max_instances = 40, concurrency = 80, texts_per_request = 4, cpu = "4", memory = "4Gi", request_timeout_seconds = 120, model_timeout_seconds = 90 }
      classify  = { concurrency = 16, env = { LOG_LEVEL = "DEBUG", MAX_QUEUED_TEXTS = "500" } }
    }
  }

  assert {
    condition = (google_cloud_run_v2_service.function["sentiment"].template[0].max_instance_request_concurrency == 80 &&
      google_cloud_run_v2_service.function["sentiment"].template[0].scaling[0].min_instance_count == 1 &&
      google_cloud_run_v2_service.function["sentiment"].template[0].scaling[0].max_instance_count == 40 &&
    google_cloud_run_v2_service.function["sentiment"].template[0].timeout == "120s")
    error_message = "Concurrency, instance counts and timeout must come from var.functions."
  }
  assert {
    condition = (one([for e in google_cloud_run_v2_service.function["sentiment"].template[0].containers[0].env : e.value if e.name == "MAX_QUEUED_TEXTS"]) == "320" &&
      one([for e in google_cloud_run_v2_service.function["sentiment"].template[0].containers[0].env : e.value if e.name == "THREADS"]) == "80" &&
      one([for e in google_cloud_run_v2_service.function["sentiment"].template[0].containers[0].env : e.value if e.name == "MODEL_WORKERS"]) == "4" &&
    one([for e in google_cloud_run_v2_service.function["sentiment"].template[0].containers[0].env : e.value if e.name == "REQUEST_TIMEOUT_SECONDS"]) == "90")
    error_message = "The queue (80 x 4), threads, model workers and model deadline must follow the sizing."
  }
  assert {
    condition = (one([for e in google_cloud_run_v2_service.function["classify"].template[0].containers[0].env : e.value if e.name == "MAX_QUEUED_TEXTS"]) == "500" &&
      one([for e in google_cloud_run_v2_service.function["classify"].template[0].containers[0].env : e.value if e.name == "LOG_LEVEL"]) == "DEBUG" &&
    google_cloud_run_v2_service.function["classify"].template[0].max_instance_request_concurrency == 16)
    error_message = "A function's env must reach the container and may override the computed queue size."
  }
  assert {
    condition     = google_cloud_run_v2_service.function["sentiment"].template[0].containers[0].resources[0].limits.memory == "4Gi"
    error_message = "Memory must come from var.functions."
  }
}

run "invokers_get_run_invoker" {
  command = plan

  variables {
    invokers = ["serviceAccount:backend@example-project.iam.gserviceaccount.com", "group:support@example.com"]
  }

  assert {
    condition     = length(google_cloud_run_v2_service_iam_member.invoker) == 4
    error_message = "Each invoker must be granted on each of the two functions."
  }
  assert {
    condition     = alltrue([for m in google_cloud_run_v2_service_iam_member.invoker : m.role == "roles/run.invoker" && m.member != "allUsers"])
    error_message = "Invokers get roles/run.invoker, and the service stays non-public."
  }
}

run "public_only_when_asked" {
  command = plan

  variables {
    allow_unauthenticated = true
  }

  assert {
    condition     = toset([for m in google_cloud_run_v2_service_iam_member.invoker : "${m.name}=${m.member}"]) == toset(["aifn-sentiment=allUsers", "aifn-classify=allUsers"])
    error_message = "allow_unauthenticated must grant allUsers on the HTTP functions (and nothing on the batch services)."
  }
}

run "image_by_digest" {
  command = plan

  variables {
    image_tag = null
    functions = {
      sentiment = { image = "europe-west1-docker.pkg.dev/example-project/aifn/sentiment@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef" }
    }
  }

  assert {
    condition     = google_cloud_run_v2_service.function["sentiment"].template[0].containers[0].image == "europe-west1-docker.pkg.dev/example-project/aifn/sentiment@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    error_message = "An image given by digest must be deployed as given."
  }
  assert {
    condition     = keys(google_cloud_run_v2_service.function) == ["sentiment"]
    error_message = "Only the functions listed are deployed."
  }
}

run "without_redis_and_batch" {
  command = plan

  variables {
    redis = { enabled = false }
    batch = { enabled = false }
  }

  assert {
    condition     = length(google_redis_instance.cache) == 0 && length(google_secret_manager_secret.redis_auth) == 0
    error_message = "redis.enabled = false must create no Memorystore instance or secret."
  }
  assert {
    condition     = alltrue([for s in google_cloud_run_v2_service.function : length([for e in s.template[0].containers[0].env : e if startswith(e.name, "REDIS_")]) == 0])
    error_message = "Without Redis no REDIS_* setting may reach the functions (they cache in process)."
  }
  assert {
    condition     = length(google_cloud_run_v2_service.batch) + length(google_cloud_run_v2_job.batch) + length(google_eventarc_trigger.batch) + length(google_service_account.eventarc) == 0
    error_message = "batch.enabled = false must create no batch service, job, trigger or identity."
  }
  assert {
    condition     = toset(keys(google_service_account.function)) == toset(["sentiment", "classify"])
    error_message = "Without batch, only the HTTP identities exist."
  }
}

run "job_args_override" {
  command = plan

  variables {
    batch = { job_task_count = 10, job_parallelism = 5, job_args = { classify = ["python", "-m", "aifn.files", "gs://elsewhere/tickets/"] } }
  }

  assert {
    condition = (google_cloud_run_v2_job.batch["classify"].template[0].template[0].containers[0].args == tolist(["python", "-m", "aifn.files", "gs://elsewhere/tickets/"]) &&
    google_cloud_run_v2_job.batch["sentiment"].template[0].task_count == 10 && google_cloud_run_v2_job.batch["sentiment"].template[0].parallelism == 5)
    error_message = "Job args, task count and parallelism must come from var.batch."
  }
}

run "rejects_a_public_member_in_invokers" {
  command = plan
  variables {
    invokers = ["allUsers"]
  }
  expect_failures = [var.invokers]
}

run "rejects_min_above_max" {
  command = plan
  variables {
    functions = { sentiment = { min_instances = 5, max_instances = 2 } }
  }
  expect_failures = [var.functions]
}

run "rejects_concurrency_out_of_range" {
  command = plan
  variables {
    functions = { sentiment = { concurrency = 1001 } }
  }
  expect_failures = [var.functions]
}

run "rejects_model_timeout_not_below_request_timeout" {
  command = plan
  variables {
    functions = { sentiment = { request_timeout_seconds = 30, model_timeout_seconds = 30 } }
  }
  expect_failures = [var.functions]
}

run "rejects_env_that_terraform_wires" {
  command = plan
  variables {
    functions = { sentiment = { env = { REDIS_HOST = "1.2.3.4" } } }
  }
  expect_failures = [var.functions]
}

run "rejects_unknown_function" {
  command = plan
  variables {
    functions = { summarize = {} }
  }
  expect_failures = [var.functions]
}

run "rejects_missing_image" {
  command = plan
  variables {
    image_tag = null
  }
  expect_failures = [var.functions]
}

run "rejects_an_image_without_tag_or_digest" {
  command = plan
  variables {
    image_tag = null
    functions = { sentiment = { image = "europe-west1-docker.pkg.dev/example-project/aifn/sentiment" } }
  }
  expect_failures = [var.functions]
}

run "rejects_a_zone_as_region" {
  command = plan
  variables {
    region = "europe-west1-b"
  }
  expect_failures = [var.region]
}

run "rejects_a_project_name" {
  command = plan
  variables {
    project_id = "My Project"
  }
  expect_failures = [var.project_id]
}

run "rejects_a_long_prefix" {
  command = plan
  variables {
    name_prefix = "a-very-long-prefix"
  }
  expect_failures = [var.name_prefix]
}

run "rejects_a_small_subnet" {
  command = plan
  variables {
    subnet_cidr = "10.8.0.0/28"
  }
  expect_failures = [var.subnet_cidr]
}

run "rejects_a_redis_tier_that_does_not_exist" {
  command = plan
  variables {
    redis = { tier = "PREMIUM" }
  }
  expect_failures = [var.redis]
}

run "rejects_overlapping_batch_prefixes" {
  command = plan
  variables {
    batch = { input_prefix = "data/", output_prefix = "data/" }
  }
  expect_failures = [var.batch]
}
