# Memorystore for Redis: the shared prediction cache. Reachable only from the VPC (no public
# endpoint exists), AUTH required, TLS with server authentication; the AUTH string goes to the
# functions through Secret Manager, never as a plain environment value.

resource "google_redis_instance" "cache" {
  count = var.redis.enabled ? 1 : 0

  project            = var.project_id
  region             = var.region
  name               = "${var.name_prefix}-cache"
  display_name       = "AI functions prediction cache"
  tier               = var.redis.tier
  memory_size_gb     = var.redis.memory_size_gb
  redis_version      = var.redis.redis_version
  authorized_network = google_compute_network.vpc.id
  connect_mode       = "DIRECT_PEERING"
  reserved_ip_range  = var.redis.reserved_ip_range

  auth_enabled            = true
  transit_encryption_mode = "SERVER_AUTHENTICATION"

  redis_configs = {
    # A cache: when full, evict the least recently used entries (every entry also has a TTL).
    maxmemory-policy = "allkeys-lru"
  }
  deletion_protection = var.deletion_protection
  labels              = local.labels

  depends_on = [google_project_service.enabled]
}

resource "google_secret_manager_secret" "redis_auth" {
  count = var.redis.enabled ? 1 : 0

  project   = var.project_id
  secret_id = "${var.name_prefix}-redis-auth"
  labels    = local.labels

  replication {
    user_managed {
      replicas {
        location = var.region
      }
    }
  }

  depends_on = [google_project_service.enabled]
}

resource "google_secret_manager_secret_version" "redis_auth" {
  count = var.redis.enabled ? 1 : 0

  secret      = google_secret_manager_secret.redis_auth[0].id
  secret_data = google_redis_instance.cache[0].auth_string
}
