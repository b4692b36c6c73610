# The Cloud Run deployment (services, Memorystore, IAM, buckets) lands with the Terraform issue;
# this file pins the toolchain it will use.
terraform {
  required_version = ">= 1.5, < 2.0"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 6.0, < 8.0"
    }
  }
}
