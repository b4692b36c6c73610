# Terraform and provider pins. The range includes hashicorp/google 8.7.0, the version whose schema
# `make infra-check` validates against offline (see README, "Checked offline").
terraform {
  # 1.9: validation blocks may refer to other variables (var.functions checks var.image_tag).
  required_version = ">= 1.9, < 2.0"

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
