output "function_urls" {
  description = "HTTPS URL of each function (call with an identity token: see README)."
  value       = { for name, s in local.services : name => s.uri }
}

output "batch_service_urls" {
  description = "Internal URL of each function's batch service (Eventarc calls it; empty when batch is off)."
  value       = { for name, s in local.batch_services : name => s.uri }
}

output "batch_jobs" {
  description = "Cloud Run job of each function for sharded backlogs: gcloud run jobs execute NAME --region REGION."
  value       = { for name, j in local.batch_jobs : name => j.name }
}

output "redis_host" {
  description = "Private address of Memorystore (null when redis.enabled is false)."
  value       = var.redis.enabled ? google_redis_instance.cache[0].host : null
}

output "redis_port" {
  description = "Memorystore's TLS port (null when redis.enabled is false)."
  value       = var.redis.enabled ? google_redis_instance.cache[0].port : null
}

output "redis_auth_secret" {
  description = "Secret Manager secret holding the Redis AUTH string (its name, not its value)."
  value       = var.redis.enabled ? google_secret_manager_secret.redis_auth[0].id : null
}

output "api_keys_secret" {
  description = "Secret Manager secret the functions read API_KEYS from (its name; null unless api_keys.enabled). Add key versions with gcloud."
  value       = var.api_keys.enabled ? google_secret_manager_secret.api_keys[0].secret_id : null
}

output "service_account_emails" {
  description = "Service account of each function (key: function) and of its batch path (key: <function>-batch), and Eventarc's."
  value = merge(
    { for name, sa in google_service_account.function : name => sa.email },
    { for sa in google_service_account.eventarc : "eventarc" => sa.email },
  )
}

output "bucket_names" {
  description = "Cloud Storage buckets: models, and per function <function>-in (inputs under <input_prefix>) and <function>-out (predictions and errors under <output_prefix>)."
  value       = { for key, b in google_storage_bucket.this : key => b.name }
}

output "image_repository" {
  description = "Where to push the images: <this>/<function>:<tag>."
  value       = local.registry
}

output "cloud_build_service_account" {
  description = "Service account to run cloudbuild.yaml as: gcloud builds submit --service-account=projects/<project>/serviceAccounts/<this> (null when cloud_build.enabled is false)."
  value       = local.cloud_build ? google_service_account.cloud_build[0].email : null
}

output "build_source_bucket" {
  description = "Bucket for gcloud builds submit --gcs-source-staging-dir=gs://<this>/source (the build's account reads sources only there; null when cloud_build.enabled is false)."
  value       = local.cloud_build ? google_storage_bucket.build_sources[0].name : null
}

output "batch_dead_letter" {
  description = "Per function: the Pub/Sub subscription Eventarc created for its trigger, the dead-letter topic and its subscription, and the gcloud commands that give the trigger's subscription its dead-letter policy (make deploy runs them; Terraform cannot manage a subscription Eventarc owns)."
  value = {
    for name, t in google_eventarc_trigger.batch : name => {
      subscription      = try(t.transport[0].pubsub[0].subscription, null)
      dead_letter_topic = google_pubsub_topic.dead_letter[name].id
      dead_letters      = google_pubsub_subscription.dead_letter[name].id
      commands = [
        join(" ", [
          "gcloud pubsub subscriptions add-iam-policy-binding", try(t.transport[0].pubsub[0].subscription, "<subscription>"),
          "--member=${local.service_agents.pubsub}", "--role=roles/pubsub.subscriber",
        ]),
        join(" ", [
          "gcloud pubsub subscriptions update", try(t.transport[0].pubsub[0].subscription, "<subscription>"),
          "--dead-letter-topic=${google_pubsub_topic.dead_letter[name].id}",
          "--max-delivery-attempts=${var.batch.dead_letter_max_attempts}",
          "--min-retry-delay=10s", "--max-retry-delay=600s",
        ]),
      ]
    }
  }
}

output "image_tag" {
  description = "The image_tag this state was applied with (infra/destroy.sh passes it back, so unlocking the deployment for destroy does not roll the images)."
  value       = var.image_tag
}
