# Issue 17's deployment fixes, each as Terraform plans or applies it against the mocked provider
# (real schema: README, "Checked offline"). Every run here failed on the module before the fix.

mock_provider "google" {
  # Service accounts keep the mock's distinct generated addresses: the tests tell identities apart.
  mock_resource "google_redis_instance" {
    defaults = {
      host            = "10.9.0.3"
      port            = 6378
      server_ca_certs = [{ cert = "PEM", create_time = "", expire_time = "", serial_number = "1", sha1_fingerprint = "" }]
    }
  }
  # The trigger's transport (the Pub/Sub subscription Eventarc creates) is a computed block,
  # which mocks leave empty: the output then shows <subscription> in its place.
  mock_data "google_project" {
    defaults = { number = "123456789012" }
  }
  mock_data "google_storage_project_service_account" {
    defaults = { member = "serviceAccount:service-123456789012@gs-project-accounts.iam.gserviceaccount.com" }
  }
}

variables {
  project_id                   = "example-project"
  image_tag                    = "c0ffee1"
  iam_propagation_wait_seconds = 0
}

# API-key mode came up with a secret that had no version while the services read "latest":
# Cloud Run refuses such a revision. Now the first version (one generated key) is written in the
# same apply, through the write-only argument, before the services that read it.
run "api_key_secret_has_a_version_in_one_apply" {
  command = apply

  variables {
    api_keys = { enabled = true }
  }

  assert {
    condition     = google_secret_manager_secret_version.api_keys_initial[0].secret == google_secret_manager_secret.api_keys[0].id
    error_message = "API-key mode must create the secret's first version itself."
  }
  assert {
    condition     = google_secret_manager_secret_version.api_keys_initial[0].secret_data_wo_version == "1" && google_secret_manager_secret_version.api_keys_initial[0].secret_data == null
    error_message = "The key must go through secret_data_wo (write-only, sent once), never secret_data (kept in the state)."
  }
  assert {
    condition     = can(regex("^[0-9a-f]{64}$", google_secret_manager_secret_version.api_keys_initial[0].secret_data_wo))
    error_message = "The generated key must be 64 hex characters (API_KEYS wants 16 or more)."
  }
  assert {
    condition = alltrue([for s in google_cloud_run_v2_service.function :
      one([for e in s.template[0].containers[0].env : e.value_source[0].secret_key_ref[0].version if e.name == "API_KEYS"]) == "latest"
    ])
    error_message = "The functions read the latest version, which now exists when they are created."
  }
}

# The Eventarc service agent gets its role explicitly, and the triggers wait for it to propagate.
run "eventarc_service_agent_before_the_triggers" {
  command = apply

  assert {
    condition = (google_project_iam_member.eventarc_agent[0].role == "roles/eventarc.serviceAgent" &&
    google_project_iam_member.eventarc_agent[0].member == "serviceAccount:service-123456789012@gcp-sa-eventarc.iam.gserviceaccount.com")
    error_message = "The Eventarc service agent (service-<number>@gcp-sa-eventarc) must hold roles/eventarc.serviceAgent."
  }
  assert {
    condition     = contains(terraform_data.eventarc_iam_propagation[0].triggers_replace, google_project_iam_member.eventarc_agent[0].id)
    error_message = "The propagation wait must follow the agent's grant (and run again if it is replaced)."
  }
}

run "the_wait_defaults_to_two_minutes" {
  command = plan

  variables {
    iam_propagation_wait_seconds = null
  }

  assert {
    condition     = terraform_data.eventarc_iam_propagation[0].input == 120
    error_message = "A real project waits 120 s after the grants, once."
  }
}

# Cloud Build's own account, with exactly what cloudbuild.yaml's steps need.
run "cloud_build_account_with_exactly_its_roles" {
  command = apply

  assert {
    condition     = google_service_account.cloud_build[0].account_id == "aifn-cloudbuild" && output.cloud_build_service_account == google_service_account.cloud_build[0].email
    error_message = "Terraform must create the build's service account and say its address."
  }
  assert {
    condition = (google_artifact_registry_repository_iam_member.cloud_build_writer[0].role == "roles/artifactregistry.writer" &&
    google_artifact_registry_repository_iam_member.cloud_build_writer[0].repository == google_artifact_registry_repository.images.name)
    error_message = "The build may push to this deployment's repository (and no other)."
  }
  assert {
    condition     = google_project_iam_member.cloud_build_logs[0].role == "roles/logging.logWriter" && length([for m in google_project_iam_member.function : m if m.member == google_service_account.cloud_build[0].member]) == 0
    error_message = "At project level the build may only write logs."
  }
  assert {
    condition = (toset([for m in google_cloud_run_v2_service_iam_member.cloud_build_developer : m.name]) == toset(["aifn-sentiment", "aifn-classify", "aifn-sentiment-batch", "aifn-classify-batch"]) &&
      toset([for m in google_cloud_run_v2_job_iam_member.cloud_build_developer : m.name]) == toset(["aifn-sentiment-job", "aifn-classify-job"]) &&
      alltrue([for m in google_cloud_run_v2_service_iam_member.cloud_build_developer : m.role == "roles/run.developer"]) &&
    alltrue([for m in google_cloud_run_v2_job_iam_member.cloud_build_developer : m.role == "roles/run.developer"]))
    error_message = "The build may update the existing services and jobs (run.developer on each), and create none."
  }
  assert {
    condition = (toset(keys(google_service_account_iam_member.cloud_build_act_as)) == toset(["sentiment", "classify", "sentiment-batch", "classify-batch"]) &&
    alltrue([for m in google_service_account_iam_member.cloud_build_act_as : m.role == "roles/iam.serviceAccountUser" && m.member == google_service_account.cloud_build[0].member]))
    error_message = "The build may act as the functions' runtime accounts only (not Eventarc's, not the project's)."
  }
  assert {
    condition     = google_storage_bucket_iam_member.build_sources[0].role == "roles/storage.objectViewer" && google_storage_bucket_iam_member.build_sources[0].bucket == output.build_source_bucket
    error_message = "The build may read the sources make deploy uploads, in their own bucket."
  }
  assert {
    condition     = contains(keys(google_project_service.enabled), "cloudbuild.googleapis.com")
    error_message = "The Cloud Build API must be enabled."
  }
}

# One owner of the running image: Terraform by default, CI when asked (the variant whose
# lifecycle ignores the image; tests/test_infra.py checks the variants are otherwise equal).
run "terraform_owns_the_image_by_default" {
  command = plan

  assert {
    condition     = length(google_cloud_run_v2_service.function) == 2 && length(google_cloud_run_v2_service.function_ci) == 0 && length(google_cloud_run_v2_service.batch_ci) == 0 && length(google_cloud_run_v2_job.batch_ci) == 0
    error_message = "By default the services are the Terraform-owned variant."
  }
}

run "ci_owns_the_image_when_asked" {
  command = apply

  variables {
    image_owner = "ci"
  }

  assert {
    condition = (length(google_cloud_run_v2_service.function) == 0 && length(google_cloud_run_v2_service.batch) == 0 && length(google_cloud_run_v2_job.batch) == 0 &&
    toset(keys(google_cloud_run_v2_service.function_ci)) == toset(["sentiment", "classify"]) && length(google_cloud_run_v2_job.batch_ci) == 2)
    error_message = "image_owner = ci must create the CI-owned variants only."
  }
  assert {
    condition     = google_cloud_run_v2_service.function_ci["sentiment"].template[0].containers[0].image == "europe-west1-docker.pkg.dev/example-project/aifn/sentiment:c0ffee1"
    error_message = "The first image still comes from image_tag (Terraform creates the service)."
  }
  assert {
    condition     = keys(output.function_urls) == ["classify", "sentiment"] && length(google_cloud_run_v2_service_iam_member.eventarc_invoker) == 2 && length(google_cloud_run_v2_service_iam_member.cloud_build_developer) == 4
    error_message = "Outputs, Eventarc and the build's grants must follow the CI-owned services."
  }
}

run "rejects_an_unknown_image_owner" {
  command = plan
  variables {
    image_owner = "cloudbuild"
  }
  expect_failures = [var.image_owner]
}

# Outputs go to another bucket than the inputs, which no trigger watches.
run "outputs_cannot_fire_a_trigger" {
  command = apply

  assert {
    condition = alltrue([for name, t in google_eventarc_trigger.batch : alltrue([
      for s in values(google_cloud_run_v2_service.batch) :
      !contains([for c in t.matching_criteria : c.value if c.attribute == "bucket"], one([for e in s.template[0].containers[0].env : e.value if e.name == "BATCH_OUTPUT_BUCKET"]))
    ])])
    error_message = "No trigger may watch a bucket that a batch service writes its outputs to."
  }
  assert {
    condition     = google_eventarc_trigger.batch["sentiment"].matching_criteria != google_eventarc_trigger.batch["classify"].matching_criteria
    error_message = "Each function's trigger watches its own input bucket: an input for one never invokes the other."
  }
}

# Issue 18: a batch identity reads only its own inputs and writes only its own outputs.
run "batch_identities_cannot_touch_each_others_files" {
  command = apply

  assert {
    condition = alltrue([for m in concat(values(google_storage_bucket_iam_member.batch_inputs), values(google_storage_bucket_iam_member.batch_outputs)) :
      m.member != google_service_account.function["sentiment-batch"].member || contains([google_storage_bucket.this["sentiment-in"].name, google_storage_bucket.this["sentiment-out"].name], m.bucket)
    ])
    error_message = "The sentiment batch identity must have no access to classify's buckets."
  }
  assert {
    condition     = google_storage_bucket_iam_member.batch_inputs["classify"].role == "roles/storage.objectViewer"
    error_message = "Inputs are read-only to the batch identity: it cannot delete or overwrite them."
  }
  assert {
    condition     = length(distinct([for b in google_storage_bucket.this : b.name])) == 5
    error_message = "Each function has its own buckets."
  }
}

# The trigger's side of delivery: retries on by default with a dead-letter topic per function;
# one attempt only when asked.
run "dead_letter_topic_per_trigger" {
  command = apply

  assert {
    condition = alltrue([for name, t in google_eventarc_trigger.batch :
    length(t.retry_policy) == 0 && google_pubsub_subscription.dead_letter[name].topic == google_pubsub_topic.dead_letter[name].id])
    error_message = "By default Eventarc retries (no retry_policy) and each function has a dead-letter topic with a subscription that keeps its messages."
  }
  assert {
    condition = alltrue([for m in google_pubsub_topic_iam_member.dead_letter_publisher :
    m.role == "roles/pubsub.publisher" && m.member == "serviceAccount:service-123456789012@gcp-sa-pubsub.iam.gserviceaccount.com"])
    error_message = "The Pub/Sub service agent must be able to publish dead letters."
  }
  assert {
    condition = (startswith(output.batch_dead_letter["classify"].commands[1], "gcloud pubsub subscriptions update <subscription> ") &&
      strcontains(output.batch_dead_letter["classify"].commands[1], "--dead-letter-topic=${google_pubsub_topic.dead_letter["classify"].id}") &&
    strcontains(output.batch_dead_letter["classify"].commands[1], "--max-delivery-attempts=5"))
    error_message = "The output must give the command that sets the trigger subscription's dead-letter policy."
  }
  assert {
    condition     = strcontains(output.batch_dead_letter["classify"].commands[0], "--role=roles/pubsub.subscriber")
    error_message = "The Pub/Sub service agent needs subscriber on the trigger's subscription to forward dead letters."
  }
}

run "one_delivery_attempt_when_retry_is_off" {
  command = plan

  variables {
    batch = { retry = false }
  }

  assert {
    condition     = alltrue([for t in google_eventarc_trigger.batch : t.retry_policy[0].max_attempts == 1])
    error_message = "batch.retry = false must set the trigger's retry_policy.max_attempts to 1 (its only value)."
  }
}

run "rejects_too_few_dead_letter_attempts" {
  command = plan
  variables {
    batch = { dead_letter_max_attempts = 2 }
  }
  expect_failures = [var.batch]
}

# Issue 18: the address charged by rate limits can only come from a load balancer's entry when
# the load balancer is the only way in.
run "forwarded_for_hops_defaults_to_one" {
  command = plan

  assert {
    condition     = alltrue([for s in google_cloud_run_v2_service.function : one([for e in s.template[0].containers[0].env : e.value if e.name == "FORWARDED_FOR_HOPS"]) == "1"])
    error_message = "FORWARDED_FOR_HOPS must reach each HTTP function, 1 by default."
  }
}

run "rejects_two_hops_with_direct_access" {
  command = plan
  variables {
    forwarded_for_hops = 2
  }
  expect_failures = [var.forwarded_for_hops]
}

run "rejects_two_hops_with_internal_ingress" {
  command = plan
  variables {
    forwarded_for_hops = 2
    ingress            = "INGRESS_TRAFFIC_INTERNAL_ONLY"
  }
  expect_failures = [var.forwarded_for_hops]
}

run "two_hops_behind_the_load_balancer_only" {
  command = plan

  variables {
    forwarded_for_hops = 2
    ingress            = "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER"
  }

  assert {
    condition     = alltrue([for s in google_cloud_run_v2_service.function : s.ingress == "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER" && one([for e in s.template[0].containers[0].env : e.value if e.name == "FORWARDED_FOR_HOPS"]) == "2"])
    error_message = "Behind the load balancer (and only there) FORWARDED_FOR_HOPS may be 2."
  }
}

run "rejects_hops_set_through_env" {
  command = plan
  variables {
    functions = { sentiment = { env = { FORWARDED_FOR_HOPS = "2" } } }
  }
  expect_failures = [var.functions]
}
