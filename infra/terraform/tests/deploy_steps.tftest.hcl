# make deploy's stages (infra/deploy.sh), in its order, against the mocked provider: the
# targeted first stage creates what the image build needs and no service; the full apply at the
# built tag gives both URLs; a re-run at the same tag keeps them; make destroy's unlock step
# changes the protection and nothing that runs. tests/test_infra.py holds the target list below
# equal to deploy.sh's STAGE1_TARGETS.

mock_provider "google" {
  mock_data "google_project" {
    defaults = { number = "123456789012" }
  }
  mock_resource "google_redis_instance" {
    defaults = {
      server_ca_certs = [{ cert = "PEM", create_time = "", expire_time = "", serial_number = "1", sha1_fingerprint = "" }]
    }
  }
}

variables {
  project_id                   = "example-project"
  region                       = "europe-west1"
  name_prefix                  = "aifn"
  image_tag                    = "0123456789ab"
  iam_propagation_wait_seconds = 0
}

run "stage1_registry" {
  command = apply

  plan_options {
    target = [
      google_project_service.enabled,
      google_artifact_registry_repository.images,
      google_service_account.cloud_build,
      google_artifact_registry_repository_iam_member.cloud_build_writer,
      google_project_iam_member.cloud_build_logs,
      google_storage_bucket.build_sources,
      google_storage_bucket_iam_member.build_sources,
    ]
  }

  assert {
    condition     = google_artifact_registry_repository.images.repository_id == "aifn" && google_artifact_registry_repository.images.docker_config[0].immutable_tags
    error_message = "Stage 1 must create the image repository (immutable tags) for stage 2 to push to."
  }
  assert {
    condition     = contains(keys(google_project_service.enabled), "run.googleapis.com") && contains(keys(google_project_service.enabled), "cloudbuild.googleapis.com")
    error_message = "Stage 1 must enable the APIs (Cloud Build's included) before the build."
  }
  assert {
    condition     = google_artifact_registry_repository_iam_member.cloud_build_writer[0].member == google_service_account.cloud_build[0].member && google_storage_bucket_iam_member.build_sources[0].member == google_service_account.cloud_build[0].member
    error_message = "Stage 1 must give the build's account its repository and sources before the build runs as it."
  }
}

run "stage3_full_apply" {
  command = apply

  assert {
    condition     = toset(keys(output.function_urls)) == toset(["sentiment", "classify"])
    error_message = "The full apply must end with both function URLs."
  }
  assert {
    condition = alltrue([for name, s in google_cloud_run_v2_service.function :
    s.template[0].containers[0].image == "europe-west1-docker.pkg.dev/example-project/aifn/${name}:0123456789ab"])
    error_message = "The services must run the images stage 2 pushed, at the tag deploy.sh computed."
  }
  assert {
    condition     = output.image_tag == "0123456789ab"
    error_message = "The state must remember the tag, for make destroy."
  }
}

run "stage3_rerun_keeps_everything" {
  command = apply

  assert {
    condition     = output.function_urls == run.stage3_full_apply.function_urls
    error_message = "Re-running make deploy at the same tag must keep the services (same URLs)."
  }
}

run "destroy_unlocks_without_rolling_the_image" {
  command = apply

  variables {
    image_tag             = run.stage3_full_apply.image_tag
    deletion_protection   = false
    force_destroy_buckets = false
  }

  assert {
    condition = alltrue([for s in google_cloud_run_v2_service.function :
    s.deletion_protection == false && endswith(s.template[0].containers[0].image, ":0123456789ab")])
    error_message = "make destroy's unlock must lift deletion protection at the deployed tag, rolling nothing."
  }
}
