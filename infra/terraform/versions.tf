# Terraform and provider pins. The range includes hashicorp/google 8.7.0, the version whose schema
# `make infra-check` validates against offline (see README, "Checked offline").
terraform {
  # 1.9: validation blocks may refer to other variables (var.functions checks var.image_tag);
  # 1.11: write-only arguments (the API-key secret's first version, apikeys.tf).
  required_version = ">= 1.11, < 2.0"

  # State in a Cloud Storage bucket by default (bucket and prefix given at init:
  # `terraform init -backend-config=bucket=<project>-tfstate -backend-config=prefix=aifn`);
  # infra/deploy.sh creates the bucket (versioned, uniform bucket-level access) before anything
  # else. The state holds secrets (README, "Secrets in the state"). Local state is an explicit
  # opt-in: infra/deploy.sh --local-state writes local_backend_override.tf.
  backend "gcs" {}

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 8.0, < 9.0"
    }
  }
}

provider "google" {
  project = var.project_id
  region  = var.region
}
