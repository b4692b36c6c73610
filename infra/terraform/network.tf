# Private networking: a VPC that Cloud Run joins through Direct VPC egress, and that Memorystore
# is peered with. Only private ranges go through it (PRIVATE_RANGES_ONLY), so Redis is reached
# over the VPC while Google APIs and the internet keep Cloud Run's default path.

resource "google_compute_network" "vpc" {
  project                 = var.project_id
  name                    = "${var.name_prefix}-vpc"
  auto_create_subnetworks = false
  description             = "Private network between the Cloud Run functions and Memorystore."

  depends_on = [google_project_service.enabled]
}

resource "google_compute_subnetwork" "run" {
  project                  = var.project_id
  name                     = "${var.name_prefix}-run"
  region                   = var.region
  network                  = google_compute_network.vpc.id
  ip_cidr_range            = var.subnet_cidr
  private_ip_google_access = true
  description              = "Addresses of the Cloud Run instances (Direct VPC egress)."

  log_config {
    aggregation_interval = "INTERVAL_5_MIN"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

# Nothing connects into this VPC: Cloud Run only egresses through it and Memorystore is peered.
# The implied rule already denies ingress; this one states it and logs what it stops.
# AVD-GCP-0074 warns about "all ports" in allow rules; this rule denies them.
#trivy:ignore:AVD-GCP-0074
resource "google_compute_firewall" "deny_ingress" {
  project     = var.project_id
  name        = "${var.name_prefix}-deny-ingress"
  network     = google_compute_network.vpc.id
  direction   = "INGRESS"
  priority    = 65534
  description = "Deny all ingress to the functions' VPC."

  deny {
    protocol = "all"
  }
  source_ranges = ["0.0.0.0/0"]

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}
