output "function_urls" {
  description = "HTTPS URL of each function (call with an identity token: see README)."
  value       = { for name, s in google_cloud_run_v2_service.function : name => s.uri }
}

output "batch_service_urls" {
  description = "Internal URL of each function's batch service (Eventarc calls it; empty when batch is off)."
  value       = { for name, s in google_cloud_run_v2_service.batch : name => s.uri }
}

output "batch_jobs" {
  description = "Cloud Run job of each function for sharded backlogs: gcloud run jobs execute NAME --region REGION."
  value       = { for name, j in google_cloud_run_v2_job.batch : name => j.name }
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
  description = "Cloud Storage buckets: models, batch (inputs under <input_prefix><function>/, predictions under <output_prefix><function>/)."
  value       = { for key, b in google_storage_bucket.this : key => b.name }
}

output "image_repository" {
  description = "Where to push the images: <this>/<function>:<tag>."
  value       = local.registry
}
