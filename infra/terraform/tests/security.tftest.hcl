# Rate limits and API-key mode: off by default, wired to the HTTP functions only when asked, and
# the caller's ID token trusted only while IAM guards the service.

mock_provider "google" {
  mock_resource "google_redis_instance" {
    defaults = {
      host            = "10.9.0.3"
      port            = 6378
      server_ca_certs = [{ cert = "PEM", create_time = "", expire_time = "", serial_number = "1", sha1_fingerprint = "" }]
    }
  }
  mock_resource "google_service_account" {
    defaults = {
      email  = "mock@example-project.iam.gserviceaccount.com"
      member = "serviceAccount:mock@example-project.iam.gserviceaccount.com"
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

run "off_by_default_and_iam_trusted" {
  command = plan

  assert {
    condition = alltrue([for s in google_cloud_run_v2_service.function :
      length([for e in s.template[0].containers[0].env : e if contains(["RATE_LIMIT", "API_KEYS"], e.name)]) == 0
    ])
    error_message = "Without rate_limit and api_keys, no function gets RATE_LIMIT or API_KEYS."
  }
  assert {
    condition = alltrue([for s in google_cloud_run_v2_service.function :
      one([for e in s.template[0].containers[0].env : e.value if e.name == "IAM_REQUIRED"]) == "true"
    ])
    error_message = "A private service (no allUsers) must tell the function that Cloud Run verified the caller."
  }
  assert {
    condition     = length(google_secret_manager_secret.api_keys) == 0 && length(google_secret_manager_secret_iam_member.api_keys) == 0
    error_message = "No API-key secret unless api_keys.enabled."
  }
}

run "public_services_do_not_trust_the_token" {
  command = plan

  variables {
    allow_unauthenticated = true
  }

  assert {
    condition = alltrue([for s in google_cloud_run_v2_service.function :
      one([for e in s.template[0].containers[0].env : e.value if e.name == "IAM_REQUIRED"]) == "false"
    ])
    error_message = "With allUsers as invoker, anyone can write the Authorization header: IAM_REQUIRED must be false."
  }
}

run "rate_limit_reaches_the_http_functions_only" {
  command = plan

  variables {
    rate_limit = "120/minute"
    functions = {
      sentiment = {}
      classify  = { env = { RATE_LIMIT = "30/minute" } }
    }
  }

  assert {
    condition     = one([for e in google_cloud_run_v2_service.function["sentiment"].template[0].containers[0].env : e.value if e.name == "RATE_LIMIT"]) == "120/minute"
    error_message = "rate_limit must reach each HTTP function as RATE_LIMIT."
  }
  assert {
    condition     = one([for e in google_cloud_run_v2_service.function["classify"].template[0].containers[0].env : e.value if e.name == "RATE_LIMIT"]) == "30/minute"
    error_message = "A function's own env RATE_LIMIT must win over rate_limit."
  }
  assert {
    condition     = length([for e in google_cloud_run_v2_service.batch["sentiment"].template[0].containers[0].env : e if contains(["RATE_LIMIT", "IAM_REQUIRED"], e.name)]) == 0
    error_message = "The batch services take no HTTP callers: rate_limit and IAM_REQUIRED stay off them."
  }
}

run "api_keys_from_secret_manager" {
  command = plan

  variables {
    api_keys = { enabled = true, secret_version = "3" }
  }

  assert {
    condition     = google_secret_manager_secret.api_keys[0].secret_id == "aifn-api-keys"
    error_message = "API-key mode must create the aifn-api-keys secret."
  }
  assert {
    condition = alltrue([for s in google_cloud_run_v2_service.function :
      one([for e in s.template[0].containers[0].env : e.value_source[0].secret_key_ref[0].version if e.name == "API_KEYS"]) == "3"
    ])
    error_message = "Each HTTP function must read API_KEYS from the secret, at the pinned version."
  }
  assert {
    condition     = toset(keys(google_secret_manager_secret_iam_member.api_keys)) == toset(["sentiment", "classify"]) && alltrue([for m in google_secret_manager_secret_iam_member.api_keys : m.role == "roles/secretmanager.secretAccessor"])
    error_message = "Only the HTTP functions' identities may read the keys (not the batch paths)."
  }
  assert {
    condition = alltrue([for s in google_cloud_run_v2_service.batch :
      length([for e in s.template[0].containers[0].env : e if e.name == "API_KEYS"]) == 0
    ])
    error_message = "The batch services must not receive the API keys."
  }
}

run "rejects_a_malformed_rate_limit" {
  command = plan
  variables {
    rate_limit = "lots"
  }
  expect_failures = [var.rate_limit]
}

run "rejects_api_keys_in_env" {
  command = plan
  variables {
    functions = { sentiment = { env = { API_KEYS = "plain-text-key-in-terraform" } } }
  }
  expect_failures = [var.functions]
}

run "rejects_a_bad_secret_version" {
  command = plan
  variables {
    api_keys = { enabled = true, secret_version = "v2" }
  }
  expect_failures = [var.api_keys]
}
