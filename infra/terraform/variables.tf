# Every input of the deployment. Only project_id and image_tag (or an image per function) are
# required; the rest has defaults sized for the functions in this repository.

variable "project_id" {
  description = "Google Cloud project to deploy into (it must exist, with billing enabled)."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a project ID (6-30 characters: lowercase letters, digits, hyphens; starts with a letter), not a project name or number."
  }
}

variable "region" {
  description = "Region for Cloud Run, Memorystore, the buckets, Artifact Registry and Eventarc (one region keeps the Redis round trip short and the Eventarc trigger next to its bucket)."
  type        = string
  default     = "europe-west1"

  validation {
    condition     = can(regex("^[a-z]+(-[a-z]+)+[0-9]+$", var.region))
    error_message = "region must be a region such as europe-west1 or us-central1 (not a zone like europe-west1-b, not a multi-region like EU)."
  }
}

variable "name_prefix" {
  description = "Prefix of every resource name (services, service accounts, buckets, Redis)."
  type        = string
  default     = "aifn"

  validation {
    # Service account ids are 6-30 characters; the longest is "<prefix>-sentiment-batch".
    condition     = can(regex("^[a-z][a-z0-9-]{1,12}[a-z0-9]$", var.name_prefix))
    error_message = "name_prefix must be 3-14 lowercase letters, digits or hyphens, starting with a letter and not ending with a hyphen."
  }
}

variable "image_tag" {
  description = "Tag of the images in this deployment's Artifact Registry repository (<region>-docker.pkg.dev/<project>/<name_prefix>/<function>:<tag>), e.g. the commit Cloud Build pushed. Ignored for a function whose `image` is set. Prefer immutable tags: the repository refuses to overwrite a tag."
  type        = string
  default     = null

  validation {
    condition     = var.image_tag == null || can(regex("^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", var.image_tag))
    error_message = "image_tag must be a Docker tag: up to 128 letters, digits, '_', '.' or '-', not starting with '.' or '-'."
  }
}

variable "functions" {
  description = <<-EOT
    The functions to deploy, keyed by entry point (sentiment, classify). Per function:
    image                   full image reference by digest (...@sha256:<64 hex>) or tag; default: the
                            repository's <function>:<image_tag>
    cpu, memory             Cloud Run limits per instance (a model worker per vCPU: MODEL_WORKERS = cpu)
    min_instances           instances kept warm (0 scales to zero; 1 removes the ~5-10 s cold start)
    max_instances           upper bound of request-based autoscaling (and of the bill)
    concurrency             max_instance_request_concurrency: requests one instance holds at once;
                            also gunicorn's THREADS, so every held request reaches the batcher
    texts_per_request       typical texts per request; MAX_QUEUED_TEXTS = concurrency x this, so a
                            full instance's requests fit its queue and only overflow gets 429
    request_timeout_seconds Cloud Run's request timeout
    model_timeout_seconds   REQUEST_TIMEOUT_SECONDS: longest wait for the model (503 after), below
                            the request timeout
    env                     further settings (README "Configuration"), e.g. LOG_LEVEL, CACHE_TTL_SECONDS;
                            they override the computed MAX_QUEUED_TEXTS/THREADS/MODEL_WORKERS but may
                            not set what Terraform wires (Redis, project, entry point)
  EOT
  type = map(object({
    image                   = optional(string)
    cpu                     = optional(string, "2")
    memory                  = optional(string, "2Gi")
    min_instances           = optional(number, 0)
    max_instances           = optional(number, 10)
    concurrency             = optional(number, 32)
    texts_per_request       = optional(number, 8)
    request_timeout_seconds = optional(number, 60)
    model_timeout_seconds   = optional(number, 30)
    env                     = optional(map(string), {})
  }))
  default = {
    sentiment = {}
    classify  = {}
  }

  validation {
    condition     = length(var.functions) > 0 && alltrue([for name in keys(var.functions) : contains(["sentiment", "classify"], name)])
    error_message = "functions must name at least one function, each one of the entry points this repository has: sentiment, classify."
  }
  validation {
    condition = alltrue([for f in values(var.functions) :
      f.image == null ? var.image_tag != null : can(regex("^[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)+(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[0-9a-f]{64})$", f.image))
    ])
    error_message = "Each function needs an image: set image_tag, or the function's image to a full reference with a tag or a sha256 digest (e.g. europe-west1-docker.pkg.dev/my-project/aifn/sentiment@sha256:...)."
  }
  validation {
    condition     = alltrue([for f in values(var.functions) : contains(["1", "2", "4", "6", "8"], f.cpu)])
    error_message = "cpu must be one of \"1\", \"2\", \"4\", \"6\", \"8\" (whole vCPUs: MODEL_WORKERS follows it)."
  }
  validation {
    condition     = alltrue([for f in values(var.functions) : can(regex("^[1-9][0-9]*(Mi|Gi)$", f.memory))])
    error_message = "memory must be a quantity like 2Gi or 4096Mi."
  }
  validation {
    condition = alltrue([for f in values(var.functions) :
      f.min_instances >= 0 && f.max_instances >= 1 && f.min_instances <= f.max_instances && f.max_instances <= 1000 &&
      floor(f.min_instances) == f.min_instances && floor(f.max_instances) == f.max_instances
    ])
    error_message = "Instance counts must be whole numbers with 0 <= min_instances <= max_instances <= 1000 and max_instances >= 1."
  }
  validation {
    condition = alltrue([for f in values(var.functions) :
      f.concurrency >= 1 && f.concurrency <= 1000 && floor(f.concurrency) == f.concurrency
    ])
    error_message = "concurrency must be a whole number from 1 to 1000 (Cloud Run's limit); 32-80 suits these functions."
  }
  validation {
    # MAX_BATCH_TEXTS (64) is the most texts one request may carry.
    condition = alltrue([for f in values(var.functions) :
      f.texts_per_request >= 1 && f.texts_per_request <= 64 && floor(f.texts_per_request) == f.texts_per_request
    ])
    error_message = "texts_per_request must be a whole number from 1 to 64 (MAX_BATCH_TEXTS)."
  }
  validation {
    condition = alltrue([for f in values(var.functions) :
      f.request_timeout_seconds >= 1 && f.request_timeout_seconds <= 3600 &&
      f.model_timeout_seconds > 0 && f.model_timeout_seconds < f.request_timeout_seconds
    ])
    error_message = "request_timeout_seconds must be 1-3600 and model_timeout_seconds above 0 and below it, so a slow request ends as the function's 503, not Cloud Run's."
  }
  validation {
    condition = alltrue([for f in values(var.functions) : alltrue([for k in keys(f.env) :
      !contains(["PORT", "FUNCTION_TARGET", "FUNCTION_SIGNATURE_TYPE", "GOOGLE_CLOUD_PROJECT", "MODEL_DIR", "REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_AUTH", "REDIS_CA_CERT", "API_KEYS", "IAM_REQUIRED", "FORWARDED_FOR_HOPS"], k) && !startswith(k, "K_") && !startswith(k, "CLOUD_RUN_") && !startswith(k, "BATCH_")
    ])])
    error_message = "env may not set PORT, K_*, CLOUD_RUN_*, FUNCTION_TARGET, FUNCTION_SIGNATURE_TYPE, GOOGLE_CLOUD_PROJECT, MODEL_DIR (baked into the image), REDIS_*, BATCH_*, API_KEYS (see api_keys), IAM_REQUIRED (follows allow_unauthenticated) or FORWARDED_FOR_HOPS (see forwarded_for_hops): Cloud Run, the image or Terraform sets them."
  }
}

variable "ingress" {
  description = "Who can reach the function URLs at the network level. INGRESS_TRAFFIC_ALL still requires an authorised caller (IAM); INTERNAL_ONLY limits callers to the project's VPC and Google services; INTERNAL_LOAD_BALANCER to an internal or external Application Load Balancer you add."
  type        = string
  default     = "INGRESS_TRAFFIC_ALL"

  validation {
    condition     = contains(["INGRESS_TRAFFIC_ALL", "INGRESS_TRAFFIC_INTERNAL_ONLY", "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER"], var.ingress)
    error_message = "ingress must be INGRESS_TRAFFIC_ALL, INGRESS_TRAFFIC_INTERNAL_ONLY or INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER."
  }
}

variable "invokers" {
  description = "IAM members allowed to call the functions (roles/run.invoker on each HTTP service), e.g. [\"serviceAccount:backend@my-project.iam.gserviceaccount.com\", \"group:support-tools@example.com\"]. Empty (the default): nobody but project owners. For public access see allow_unauthenticated."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for m in var.invokers : can(regex("^(user|serviceAccount|group|domain|principal|principalSet):.+$", m))])
    error_message = "Each invoker must be an IAM member such as user:alice@example.com, serviceAccount:..., group:..., domain:example.com; allUsers and allAuthenticatedUsers are not accepted here (see allow_unauthenticated)."
  }
}

variable "allow_unauthenticated" {
  description = "DANGER: grant roles/run.invoker to allUsers, making every function URL public. Anyone on the internet can then run the model on your bill. Leave false unless a gateway in front does authentication and rate limiting."
  type        = bool
  default     = false
}

variable "redis" {
  description = "Memorystore for Redis, the shared prediction cache. enabled=false: each instance caches in its own memory. tier BASIC (one node) or STANDARD_HA (replicated, ~2x the price); memory_size_gb 1-300 (about 10 M cached texts per GB); reserved_ip_range: a /29 or larger for the instance, or null to let Google pick."
  type = object({
    enabled           = optional(bool, true)
    tier              = optional(string, "BASIC")
    memory_size_gb    = optional(number, 1)
    redis_version     = optional(string, "REDIS_7_2")
    reserved_ip_range = optional(string)
  })
  default = {}

  validation {
    condition     = contains(["BASIC", "STANDARD_HA"], var.redis.tier)
    error_message = "redis.tier must be BASIC or STANDARD_HA."
  }
  validation {
    condition     = var.redis.memory_size_gb >= 1 && var.redis.memory_size_gb <= 300 && floor(var.redis.memory_size_gb) == var.redis.memory_size_gb
    error_message = "redis.memory_size_gb must be a whole number from 1 to 300."
  }
  validation {
    condition     = can(regex("^REDIS_[0-9]+(_[0-9]+)?$", var.redis.redis_version))
    error_message = "redis.redis_version must look like REDIS_7_2."
  }
  validation {
    condition     = var.redis.reserved_ip_range == null || (can(cidrnetmask(var.redis.reserved_ip_range)) && try(tonumber(split("/", var.redis.reserved_ip_range)[1]) <= 29, false))
    error_message = "redis.reserved_ip_range must be a CIDR range of /29 or larger, e.g. 10.9.0.0/29."
  }
}

variable "subnet_cidr" {
  description = "Range of the subnet that Cloud Run instances egress from (Direct VPC egress takes their addresses from it: /26 or larger; a /24 allows ~100 instances at once across the services)."
  type        = string
  default     = "10.8.0.0/24"

  validation {
    condition     = can(cidrnetmask(var.subnet_cidr)) && try(tonumber(split("/", var.subnet_cidr)[1]) <= 26, false)
    error_message = "subnet_cidr must be a CIDR range of /26 or larger, e.g. 10.8.0.0/24."
  }
}

variable "batch" {
  description = <<-EOT
    Batch inference over Cloud Storage, two buckets per function: <project>-<prefix>-<function>-in
    (inputs) and <project>-<prefix>-<function>-out (predictions and errors files). A function's
    trigger listens to its own input bucket only, its outputs can never fire a trigger, and each
    function's batch identity reads only its own inputs and writes only its own outputs.
    enabled                 an event-driven batch service per function (Eventarc, object finalized) and a
                            Cloud Run job per function for sharded backlogs
    input_prefix            files under <input_prefix> of the input bucket are processed; predictions are
                            written under <output_prefix> of the output bucket
    output_prefix
    max_instances           batch service autoscaling bound; concurrency is 1 file per instance
    timeout_seconds         batch service request timeout (Eventarc retries past Pub/Sub's 600 s ack deadline)
    retry                   true: Eventarc redelivers an event the service did not acknowledge (Pub/Sub
                            back-off 10-600 s, for up to 24 h, then to the dead-letter topic); false: one
                            delivery attempt (the trigger's retry_policy.max_attempts = 1, its only value)
    dead_letter_max_attempts deliveries before Pub/Sub moves an event to the dead-letter topic (5-100)
    job_task_count          tasks (shards) per job execution; job_parallelism how many run at once (0: all)
    job_timeout_seconds     per task
    job_command, job_args   per function name; default args: python -m aifn.files gs://<input bucket>/<input prefix>
    retention_days          objects in the batch buckets are deleted after this many days (0: kept)
  EOT
  type = object({
    enabled                  = optional(bool, true)
    input_prefix             = optional(string, "inputs/")
    output_prefix            = optional(string, "predictions/")
    max_instances            = optional(number, 5)
    timeout_seconds          = optional(number, 600)
    retry                    = optional(bool, true)
    dead_letter_max_attempts = optional(number, 5)
    job_task_count           = optional(number, 4)
    job_parallelism          = optional(number, 0)
    job_timeout_seconds      = optional(number, 3600)
    job_command              = optional(map(list(string)), {})
    job_args                 = optional(map(list(string)), {})
    retention_days           = optional(number, 30)
  })
  default = {}

  validation {
    condition     = alltrue([for p in [var.batch.input_prefix, var.batch.output_prefix] : can(regex("^[A-Za-z0-9_.-]+/$", p))]) && var.batch.input_prefix != var.batch.output_prefix
    error_message = "batch.input_prefix and batch.output_prefix must be distinct single folder names ending in '/', e.g. inputs/ and predictions/."
  }
  validation {
    condition = (var.batch.max_instances >= 1 && var.batch.max_instances <= 1000 &&
      var.batch.timeout_seconds >= 1 && var.batch.timeout_seconds <= 3600 &&
      var.batch.job_task_count >= 1 && var.batch.job_task_count <= 10000 &&
      var.batch.job_parallelism >= 0 && var.batch.job_parallelism <= var.batch.job_task_count &&
      var.batch.job_timeout_seconds >= 1 && var.batch.job_timeout_seconds <= 86400 &&
    var.batch.retention_days >= 0)
    error_message = "batch: max_instances 1-1000, timeout_seconds 1-3600, job_task_count 1-10000, job_parallelism 0-job_task_count, job_timeout_seconds 1-86400, retention_days >= 0."
  }
  validation {
    # Pub/Sub's dead-letter policy accepts 5 to 100 delivery attempts.
    condition     = var.batch.dead_letter_max_attempts >= 5 && var.batch.dead_letter_max_attempts <= 100 && floor(var.batch.dead_letter_max_attempts) == var.batch.dead_letter_max_attempts
    error_message = "batch.dead_letter_max_attempts must be a whole number from 5 to 100 (Pub/Sub's range for max delivery attempts)."
  }
}

variable "model_readers" {
  description = "IAM members that may read the models bucket (roles/storage.objectViewer), e.g. the service account that builds the images. The functions never read it: their model is in the image."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for m in var.model_readers : can(regex("^(user|serviceAccount|group|domain|principal|principalSet):.+$", m))])
    error_message = "model_readers must be IAM members (user:, serviceAccount:, group:, domain:, principal:, principalSet:); the bucket is never public."
  }
}

variable "labels" {
  description = "Labels added to every resource that takes labels (e.g. cost-center)."
  type        = map(string)
  default     = {}
}

variable "enable_apis" {
  description = "Enable the Google APIs the deployment uses. Set false where a platform team enables APIs for you. They are left enabled on destroy."
  type        = bool
  default     = true
}

variable "deletion_protection" {
  description = "Protect the Cloud Run services and jobs and the Redis instance from `terraform destroy`. Set false (and apply) before tearing down."
  type        = bool
  default     = true
}

variable "force_destroy_buckets" {
  description = "Let `terraform destroy` delete the buckets with their objects (models, inputs, predictions). Off by default: a destroy then stops at a non-empty bucket."
  type        = bool
  default     = false
}

variable "rate_limit" {
  description = "Requests each client may make to each HTTP function, e.g. \"60/minute\" or \"10/second\" (RATE_LIMIT; a token bucket in Redis shared by all instances, per instance without Redis). A client is its API key, else the caller Cloud Run IAM verified, else its address. null (the default): no limit. A function's env may set its own RATE_LIMIT."
  type        = string
  default     = null

  validation {
    condition     = var.rate_limit == null || can(regex("^[1-9][0-9]*/([1-9][0-9]*)?(s|sec|second|m|min|minute|h|hour)s?$", var.rate_limit))
    error_message = "rate_limit must look like 60/minute, 10/second, 1000/hour or 10/30s."
  }
}

variable "api_keys" {
  description = <<-EOT
    API-key mode, for callers that do not use Cloud Run IAM (e.g. with allow_unauthenticated behind your
    own gateway). enabled: create the secret <name_prefix>-api-keys with a first version holding one
    generated key (64 hex characters), and pass it to the HTTP functions as API_KEYS; requests then need
    one of its keys in X-API-Key. The generated key is written through the write-only argument
    secret_data_wo: it is in neither the plan nor the state; read it with
    `gcloud secrets versions access latest --secret <name_prefix>-api-keys`. Later keys: add versions
    with gcloud (comma-separated keys of 16+ characters), never through Terraform.
    secret_version: the version the functions read; "latest" (read when an instance starts) or a number
    pinned to roll keys out as a new revision.
  EOT
  type = object({
    enabled        = optional(bool, false)
    secret_version = optional(string, "latest")
  })
  default = {}

  validation {
    condition     = can(regex("^(latest|[1-9][0-9]*)$", var.api_keys.secret_version))
    error_message = "api_keys.secret_version must be \"latest\" or a version number such as \"3\"."
  }
}

variable "forwarded_for_hops" {
  description = "FORWARDED_FOR_HOPS of the HTTP functions: which X-Forwarded-For entry, counted from the right, is the client address that rate limits charge when a request has no API key or IAM identity. 1 (the default) is right on a run.app URL. 2 is right behind an external Application Load Balancer, and only safe when the load balancer is the only way in: a caller reaching run.app directly would choose the address charged. So values above 1 require ingress = INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER."
  type        = number
  default     = 1

  validation {
    condition     = var.forwarded_for_hops >= 0 && var.forwarded_for_hops <= 5 && floor(var.forwarded_for_hops) == var.forwarded_for_hops
    error_message = "forwarded_for_hops must be a whole number from 0 to 5."
  }
  validation {
    condition     = var.forwarded_for_hops <= 1 || var.ingress == "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER"
    error_message = "forwarded_for_hops above 1 trusts an address a load balancer appended, so it needs ingress = \"INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER\": with direct run.app access allowed, any caller could forge the X-Forwarded-For entry that rate limits charge."
  }
}

variable "image_owner" {
  description = <<-EOT
    Who sets the image each service and job runs:
    terraform  (default) image_tag or a function's image; every apply deploys exactly that, and a
               new release is a new image_tag and `terraform apply` (`make deploy` does this).
    ci         Cloud Build (cloudbuild.yaml) rolls new images with `gcloud run services update --image`;
               Terraform sets the image only when it creates a service and then ignores it
               (lifecycle.ignore_changes), so an apply never rolls back what CI deployed.
    The two modes are two resource variants (ignore_changes cannot depend on a variable): switching
    an existing deployment moves the services in the state (README, "Who owns the running image").
  EOT
  type        = string
  default     = "terraform"

  validation {
    condition     = contains(["terraform", "ci"], var.image_owner)
    error_message = "image_owner must be \"terraform\" or \"ci\"."
  }
}

variable "iam_propagation_wait_seconds" {
  description = "Seconds to wait, once, after granting the Eventarc and Pub/Sub service agents their roles and before creating the Eventarc triggers (Google: \"it may take a few minutes before all necessary permissions are propagated to the Service Agent\"). Runs `sleep` on the machine running Terraform when the grants are created or change; 0 skips it."
  type        = number
  default     = 120
  nullable    = false

  validation {
    condition     = var.iam_propagation_wait_seconds >= 0 && var.iam_propagation_wait_seconds <= 1800 && floor(var.iam_propagation_wait_seconds) == var.iam_propagation_wait_seconds
    error_message = "iam_propagation_wait_seconds must be a whole number from 0 to 1800."
  }
}

variable "cloud_build" {
  description = <<-EOT
    The service account Cloud Build runs cloudbuild.yaml as (`gcloud builds submit --service-account`,
    or a trigger's service account), created with only what the build's steps need: push to this
    deployment's Artifact Registry repository, update (never create) the functions' services and
    jobs, act as their runtime service accounts, write build logs. enabled = false: no account.
  EOT
  type = object({
    enabled = optional(bool, true)
  })
  default = {}
}
