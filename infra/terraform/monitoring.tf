# Operations as code (README, "Monitoring"): per deployment, a Cloud Monitoring dashboard, alert
# policies against an SLO, an uptime check on each HTTP function's /v1/health, and the log-based
# metrics the dashboard reads. `monitoring_enabled = false` creates none of it.
#
# Every series read here is one the services really emit:
# - Cloud Run's own metrics (https://cloud.google.com/monitoring/api/metrics_gcp_p_z#gcp-run):
#   run.googleapis.com/request_count (labels response_code, response_code_class),
#   run.googleapis.com/request_latencies (a distribution, ms) and
#   run.googleapis.com/container/instance_count (label state), on resource cloud_run_revision;
# - log-based metrics defined below from the JSON lines the functions print (aifn.logs): the
#   request log of aifn.http.service (logger "aifn.request", field error_type on every error) and the
#   per-file summary of aifn.files.processor (logger "aifn.batch", fields records, predictions, errors, and
#   the message "... N from the cache)"). Cloud Run's logging agent keeps such a line's fields
#   in jsonPayload (message included); tests/test_monitoring.py checks each filter and extractor
#   against lines the real code prints.
# Not shown: the HTTP path's prediction-cache hit ratio. The functions count it only in-process
# (GET /metrics, GET /v1/health) and log no per-request cache field, so no metric here can read
# it; the batch path's ratio is shown, from the per-file summary.

variable "monitoring_enabled" {
  description = "Create the Cloud Monitoring dashboard, alert policies, uptime checks and log-based metrics (monitoring.tf). false: none of them."
  type        = bool
  default     = true
}

variable "monitoring_notification_channels" {
  description = "Notification channel ids (projects/<project>/notificationChannels/<id>) the alert policies notify. Empty: incidents open in the console only."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.monitoring_notification_channels : can(regex("^projects/[^/]+/notificationChannels/[^/]+$", c))])
    error_message = "Each notification channel must be a full id: projects/<project>/notificationChannels/<id>."
  }
}

variable "monitoring_uptime_checks" {
  description = "Uptime checks on each HTTP function's GET /v1/health, authenticated with an ID token of the Monitoring service agent (granted roles/run.invoker on the HTTP services for it). Only with ingress = INGRESS_TRAFFIC_ALL: the checkers call from the internet."
  type        = bool
  default     = true
}

variable "monitoring_uptime_period" {
  description = "How often each uptime check runs (one of Cloud Monitoring's periods). Each run is a request from each checker region; with min_instances = 0 a check may meet a cold start."
  type        = string
  default     = "300s"

  validation {
    condition     = contains(["60s", "300s", "600s", "900s"], var.monitoring_uptime_period)
    error_message = "monitoring_uptime_period must be 60s, 300s, 600s or 900s."
  }
}

variable "slo_availability" {
  description = "Availability objective of the HTTP functions: the error-ratio alert fires when more than 1 - slo_availability of requests answer 5xx over slo_window_seconds (0.99: 1%). 429s are not counted (overload and rate limits are shown on the dashboard, by cause)."
  type        = number
  default     = 0.99

  validation {
    condition     = var.slo_availability >= 0.5 && var.slo_availability < 1
    error_message = "slo_availability must be at least 0.5 and below 1 (e.g. 0.99, 0.999)."
  }
}

variable "slo_latency_p99_ms" {
  description = "Latency objective: the latency alert fires when a function's 99th percentile request latency stays above this many milliseconds for slo_window_seconds. Cold starts count (min_instances = 0 makes them frequent at low traffic)."
  type        = number
  default     = 2000

  validation {
    condition     = var.slo_latency_p99_ms > 0
    error_message = "slo_latency_p99_ms must be a positive number of milliseconds."
  }
}

variable "slo_window_seconds" {
  description = "How long a breach must last before an alert opens (the alert conditions' duration), in seconds."
  type        = number
  default     = 300

  validation {
    condition     = var.slo_window_seconds >= 60 && var.slo_window_seconds <= 86400 && var.slo_window_seconds % 60 == 0
    error_message = "slo_window_seconds must be a whole number of minutes, from 60 to 86400."
  }
}

locals {
  # The services whichever variant owns their image (main.tf's local.services/batch_services).
  monitored_http  = var.monitoring_enabled ? { for name, s in local.services : name => s.name } : {}
  monitored_batch = var.monitoring_enabled ? { for name, s in local.batch_services : name => s.name } : {}

  uptime_services = (var.monitoring_enabled && var.monitoring_uptime_checks && var.ingress == "INGRESS_TRAFFIC_ALL"
    ? local.services : {}
  )
  # The agent whose OIDC token uptime checks with service_agent_authentication carry.
  monitoring_agent = "serviceAccount:service-${local.project_number}@gcp-sa-monitoring-notification.iam.gserviceaccount.com"

  http_filter  = "resource.type=\"cloud_run_revision\" AND resource.labels.service_name=one_of(${join(",", [for n in values(local.monitored_http) : "\"${n}\""])})"
  batch_filter = "resource.type=\"cloud_run_revision\" AND resource.labels.service_name=one_of(${join(",", [for n in values(local.monitored_batch) : "\"${n}\""])})"

  # The batch path's per-file summary (aifn.files.processor Processor.handle_event), for processed files
  # only: a redelivered, already-done file logs "already done (redelivery)" instead.
  batch_summary_filter = join(" AND ", [
    local.batch_filter,
    "jsonPayload.logger=\"aifn.batch\"",
    "jsonPayload.message=~\"from the cache[)]$\"",
  ])

  # Log-based distribution metrics: one value per processed file.
  batch_values = {
    lines       = { extractor = "EXTRACT(jsonPayload.records)", what = "Lines read (good and bad) per batch file" }
    predictions = { extractor = "EXTRACT(jsonPayload.predictions)", what = "Texts predicted per batch file" }
    line_errors = { extractor = "EXTRACT(jsonPayload.errors)", what = "Lines reported in the errors file, per batch file" }
    cached      = { extractor = "REGEXP_EXTRACT(jsonPayload.message, \"([0-9]+) from the cache[)]$\")", what = "Texts answered from the prediction cache, per batch file" }
  }

  # The request log line of each answered prediction (aifn.http.service: texts, and how many of them
  # the prediction cache answered), for the HTTP cache hit ratio.
  http_prediction_filter = join(" AND ", [
    local.http_filter,
    "jsonPayload.logger=\"aifn.request\"",
    "jsonPayload.texts:*",
  ])
  http_values = {
    texts  = { extractor = "EXTRACT(jsonPayload.texts)", what = "Texts predicted per HTTP request" }
    cached = { extractor = "EXTRACT(jsonPayload.cached)", what = "Texts answered from the prediction cache, per HTTP request" }
  }

  log_metric_prefix = "logging.googleapis.com/user/${var.name_prefix}"

  by_service = ["resource.label.service_name"]

  # Dashboard charts, two per row. Each data set is a Cloud Monitoring TimeSeriesQuery.
  http_rate = { for name, cls in { requests = "", "4xx" = "4xx", "5xx" = "5xx" } : name => {
    timeSeriesFilter = {
      filter = join(" AND ", compact([
        "metric.type=\"run.googleapis.com/request_count\"", local.http_filter,
        cls == "" ? "" : "metric.labels.response_code_class=\"${cls}\"",
      ]))
      aggregation = { alignmentPeriod = "60s", perSeriesAligner = "ALIGN_RATE", crossSeriesReducer = "REDUCE_SUM", groupByFields = local.by_service }
    }
  } }

  charts = concat(
    [
      {
        title = "Requests per second", dataSets = [{ plotType = "LINE", timeSeriesQuery = local.http_rate["requests"], legendTemplate = "$${resource.labels.service_name}" }]
      },
      {
        title = "Latency p50 / p99 (ms)",
        dataSets = [for p in ["50", "99"] : {
          plotType       = "LINE"
          legendTemplate = "p${p} $${resource.labels.service_name}"
          timeSeriesQuery = { timeSeriesFilter = {
            filter      = "metric.type=\"run.googleapis.com/request_latencies\" AND ${local.http_filter}"
            aggregation = { alignmentPeriod = "60s", perSeriesAligner = "ALIGN_DELTA", crossSeriesReducer = "REDUCE_PERCENTILE_${p}", groupByFields = local.by_service }
          } }
        }]
        thresholds = [{ value = var.slo_latency_p99_ms, label = "p99 objective", color = "RED", direction = "ABOVE" }]
      },
      {
        title = "4xx and 5xx per second",
        dataSets = [for cls in ["4xx", "5xx"] : {
          plotType = "LINE", timeSeriesQuery = local.http_rate[cls], legendTemplate = "${cls} $${resource.labels.service_name}"
        }]
      },
      {
        title = "429 per second (Cloud Run and function; causes in the next chart)",
        dataSets = [{
          plotType       = "LINE"
          legendTemplate = "429 $${resource.labels.service_name}"
          timeSeriesQuery = { timeSeriesFilter = {
            filter      = "metric.type=\"run.googleapis.com/request_count\" AND ${local.http_filter} AND metric.labels.response_code=\"429\""
            aggregation = { alignmentPeriod = "60s", perSeriesAligner = "ALIGN_RATE", crossSeriesReducer = "REDUCE_SUM", groupByFields = local.by_service }
          } }
        }]
      },
      {
        title = "Error answers by type per second (overloaded, rate_limited, deadline_exceeded...)",
        dataSets = [{
          plotType       = "STACKED_BAR"
          legendTemplate = "$${metric.labels.error_type} $${resource.labels.service_name}"
          timeSeriesQuery = { timeSeriesFilter = {
            filter      = "metric.type=\"${local.log_metric_prefix}_request_errors\" AND resource.type=\"cloud_run_revision\""
            aggregation = { alignmentPeriod = "60s", perSeriesAligner = "ALIGN_RATE", crossSeriesReducer = "REDUCE_SUM", groupByFields = concat(local.by_service, ["metric.label.error_type"]) }
          } }
        }]
      },
      {
        title = "Prediction-cache hit ratio (cached / predicted texts)",
        dataSets = [{
          plotType       = "LINE"
          legendTemplate = "$${resource.labels.service_name}"
          timeSeriesQuery = { timeSeriesFilterRatio = {
            numerator = {
              filter      = "metric.type=\"${local.log_metric_prefix}_http_cached\" AND resource.type=\"cloud_run_revision\""
              aggregation = { alignmentPeriod = "300s", perSeriesAligner = "ALIGN_SUM", crossSeriesReducer = "REDUCE_MEAN", groupByFields = local.by_service }
            }
            denominator = {
              filter      = "metric.type=\"${local.log_metric_prefix}_http_texts\" AND resource.type=\"cloud_run_revision\""
              aggregation = { alignmentPeriod = "300s", perSeriesAligner = "ALIGN_SUM", crossSeriesReducer = "REDUCE_MEAN", groupByFields = local.by_service }
            }
          } }
        }]
      },
      {
        title = "5xx ratio",
        dataSets = [{
          plotType       = "LINE"
          legendTemplate = "$${resource.labels.service_name}"
          timeSeriesQuery = { timeSeriesFilterRatio = {
            numerator   = local.http_rate["5xx"].timeSeriesFilter
            denominator = local.http_rate["requests"].timeSeriesFilter
          } }
        }]
        thresholds = [{ value = 1 - var.slo_availability, label = "error budget", color = "RED", direction = "ABOVE" }]
      },
      {
        title = "Instances",
        dataSets = [{
          plotType       = "STACKED_AREA"
          legendTemplate = "$${metric.labels.state} $${resource.labels.service_name}"
          timeSeriesQuery = { timeSeriesFilter = {
            filter      = "metric.type=\"run.googleapis.com/container/instance_count\" AND resource.type=\"cloud_run_revision\" AND resource.labels.service_name=one_of(${join(",", [for n in concat(values(local.monitored_http), values(local.monitored_batch)) : "\"${n}\""])})"
            aggregation = { alignmentPeriod = "60s", perSeriesAligner = "ALIGN_MAX", crossSeriesReducer = "REDUCE_SUM", groupByFields = concat(local.by_service, ["metric.label.state"]) }
          } }
        }]
      },
    ],
    [for chart in [
      {
        title = "Batch files processed per minute",
        dataSets = [{
          plotType       = "STACKED_BAR"
          legendTemplate = "$${resource.labels.service_name}"
          timeSeriesQuery = { timeSeriesFilter = {
            filter      = "metric.type=\"${local.log_metric_prefix}_batch_files\" AND resource.type=\"cloud_run_revision\""
            aggregation = { alignmentPeriod = "60s", perSeriesAligner = "ALIGN_SUM", crossSeriesReducer = "REDUCE_SUM", groupByFields = local.by_service }
          } }
        }]
      },
      {
        title = "Batch lines per file (mean): read, predicted, errors",
        dataSets = [for v in ["lines", "predictions", "line_errors"] : {
          plotType       = "LINE"
          legendTemplate = "${v} $${resource.labels.service_name}"
          timeSeriesQuery = { timeSeriesFilter = {
            filter      = "metric.type=\"${local.log_metric_prefix}_batch_${v}\" AND resource.type=\"cloud_run_revision\""
            aggregation = { alignmentPeriod = "300s", perSeriesAligner = "ALIGN_SUM", crossSeriesReducer = "REDUCE_MEAN", groupByFields = local.by_service }
          } }
        }]
      },
      {
        title = "Batch prediction-cache hit ratio (cached / predicted texts)",
        dataSets = [{
          plotType       = "LINE"
          legendTemplate = "$${resource.labels.service_name}"
          timeSeriesQuery = { timeSeriesFilterRatio = {
            numerator = {
              filter      = "metric.type=\"${local.log_metric_prefix}_batch_cached\" AND resource.type=\"cloud_run_revision\""
              aggregation = { alignmentPeriod = "300s", perSeriesAligner = "ALIGN_SUM", crossSeriesReducer = "REDUCE_MEAN", groupByFields = local.by_service }
            }
            denominator = {
              filter      = "metric.type=\"${local.log_metric_prefix}_batch_predictions\" AND resource.type=\"cloud_run_revision\""
              aggregation = { alignmentPeriod = "300s", perSeriesAligner = "ALIGN_SUM", crossSeriesReducer = "REDUCE_MEAN", groupByFields = local.by_service }
            }
          } }
        }]
      },
    ] : chart if length(local.monitored_batch) > 0],
  )

  dashboard = {
    displayName = "${var.name_prefix} functions"
    mosaicLayout = {
      columns = 48
      tiles = [for i, chart in local.charts : {
        xPos   = (i % 2) * 24
        yPos   = floor(i / 2) * 16
        width  = 24
        height = 16
        widget = {
          title = chart.title
          xyChart = merge(
            { dataSets = chart.dataSets, timeshiftDuration = "0s", yAxis = { scale = "LINEAR" } },
            can(chart.thresholds) ? { thresholds = chart.thresholds } : {},
          )
        }
      }]
    }
  }
}

# Log-based metrics. Each is a series per Cloud Run revision (resource cloud_run_revision, so the
# dashboard groups them by resource.label.service_name).

resource "google_logging_metric" "request_errors" {
  count = length(local.monitored_http) > 0 ? 1 : 0

  project     = var.project_id
  name        = "${var.name_prefix}_request_errors"
  description = "HTTP answers that are errors, by the function's error type (the JSON error's type)."
  filter      = "${local.http_filter} AND jsonPayload.logger=\"aifn.request\" AND jsonPayload.error_type:*"

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "${var.name_prefix} error answers"
    labels {
      key         = "error_type"
      value_type  = "STRING"
      description = "invalid_request, overloaded, rate_limited, deadline_exceeded, ..."
    }
  }
  label_extractors = {
    error_type = "EXTRACT(jsonPayload.error_type)"
  }

  depends_on = [google_project_service.enabled]
}

resource "google_logging_metric" "http" {
  for_each = length(local.monitored_http) > 0 ? local.http_values : {}

  project         = var.project_id
  name            = "${var.name_prefix}_http_${each.key}"
  description     = "${each.value.what} (the function's request log line of an answered prediction)."
  filter          = local.http_prediction_filter
  value_extractor = each.value.extractor

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "DISTRIBUTION"
    unit         = "1"
    display_name = "${var.name_prefix} ${each.key} texts per request"
  }
  bucket_options {
    exponential_buckets {
      num_finite_buckets = 16
      growth_factor      = 2
      scale              = 1
    }
  }

  depends_on = [google_project_service.enabled]
}

resource "google_logging_metric" "batch_files" {
  count = length(local.monitored_batch) > 0 ? 1 : 0

  project     = var.project_id
  name        = "${var.name_prefix}_batch_files"
  description = "Batch files processed (the batch service's per-file summary line; redeliveries of a done file are not counted)."
  filter      = local.batch_summary_filter

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "${var.name_prefix} batch files"
  }

  depends_on = [google_project_service.enabled]
}

resource "google_logging_metric" "batch" {
  for_each = length(local.monitored_batch) > 0 ? local.batch_values : {}

  project         = var.project_id
  name            = "${var.name_prefix}_batch_${each.key}"
  description     = "${each.value.what} (the batch service's per-file summary line)."
  filter          = local.batch_summary_filter
  value_extractor = each.value.extractor

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "DISTRIBUTION"
    unit         = "1"
    display_name = "${var.name_prefix} batch ${replace(each.key, "_", " ")} per file"
  }
  bucket_options {
    exponential_buckets {
      num_finite_buckets = 32
      growth_factor      = 2
      scale              = 1
    }
  }

  depends_on = [google_project_service.enabled]
}

resource "google_monitoring_dashboard" "functions" {
  count = var.monitoring_enabled ? 1 : 0

  project        = var.project_id
  dashboard_json = jsonencode(local.dashboard)

  depends_on = [google_logging_metric.request_errors, google_logging_metric.http, google_logging_metric.batch_files, google_logging_metric.batch, google_project_service.enabled]
}

# Uptime checks: GET https://<service host>/v1/health every monitoring_uptime_period from
# Google's checker regions, with the Monitoring service agent's OIDC token (audience: the URL),
# and a pass only for 2xx whose body says "status":"ok" (aifn.http.service's health answer).

resource "google_monitoring_uptime_check_config" "health" {
  for_each = local.uptime_services

  project      = var.project_id
  display_name = "${each.value.name} /v1/health"
  period       = var.monitoring_uptime_period
  timeout      = "10s"

  http_check {
    request_method = "GET"
    path           = "/v1/health"
    port           = 443
    use_ssl        = true
    validate_ssl   = true

    service_agent_authentication {
      type = "OIDC_TOKEN"
    }

    accepted_response_status_codes {
      status_class = "STATUS_CLASS_2XX"
    }
  }

  monitored_resource {
    type = "uptime_url"
    labels = {
      project_id = var.project_id
      host       = trimsuffix(trimprefix(each.value.uri, "https://"), "/")
    }
  }

  content_matchers {
    content = "\"status\":\"ok\""
    matcher = "CONTAINS_STRING"
  }

  depends_on = [google_project_service.enabled]
}

# The checks call private services: the Monitoring service agent may invoke the HTTP functions
# (and only them), as Google documents for uptime checks with service agent authentication.
# After the checks, which are what makes Monitoring provision its agent in a new project.
resource "google_cloud_run_v2_service_iam_member" "uptime_invoker" {
  for_each = var.allow_unauthenticated ? {} : local.uptime_services

  project  = var.project_id
  location = var.region
  name     = each.value.name
  role     = "roles/run.invoker"
  member   = local.monitoring_agent

  depends_on = [google_monitoring_uptime_check_config.health]
}

resource "google_monitoring_alert_policy" "error_ratio" {
  count = length(local.monitored_http) > 0 ? 1 : 0

  project               = var.project_id
  display_name          = "${var.name_prefix}: 5xx ratio above ${format("%g", (1 - var.slo_availability) * 100)}%"
  combiner              = "OR"
  notification_channels = var.monitoring_notification_channels
  user_labels           = local.labels

  conditions {
    display_name = "5xx / all requests > ${format("%g", 1 - var.slo_availability)} for ${var.slo_window_seconds}s"
    condition_threshold {
      filter                  = local.http_rate["5xx"].timeSeriesFilter.filter
      denominator_filter      = local.http_rate["requests"].timeSeriesFilter.filter
      comparison              = "COMPARISON_GT"
      threshold_value         = 1 - var.slo_availability
      duration                = "${var.slo_window_seconds}s"
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
      aggregations {
        alignment_period     = "60s"
        per_series_aligner   = "ALIGN_RATE"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = local.by_service
      }
      denominator_aggregations {
        alignment_period     = "60s"
        per_series_aligner   = "ALIGN_RATE"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = local.by_service
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "More than ${format("%g", (1 - var.slo_availability) * 100)}% of requests to $${resource.label.service_name} answered 5xx for ${var.slo_window_seconds} s (objective: ${var.slo_availability}). The request log has each error with its trace: `jsonPayload.logger=\"aifn.request\" AND severity>=ERROR`."
  }

  depends_on = [google_project_service.enabled]
}

resource "google_monitoring_alert_policy" "latency" {
  count = length(local.monitored_http) > 0 ? 1 : 0

  project               = var.project_id
  display_name          = "${var.name_prefix}: p99 latency above ${var.slo_latency_p99_ms} ms"
  combiner              = "OR"
  notification_channels = var.monitoring_notification_channels
  user_labels           = local.labels

  conditions {
    display_name = "p99 request latency > ${var.slo_latency_p99_ms} ms for ${var.slo_window_seconds}s"
    condition_threshold {
      filter                  = "metric.type=\"run.googleapis.com/request_latencies\" AND ${local.http_filter}"
      comparison              = "COMPARISON_GT"
      threshold_value         = var.slo_latency_p99_ms
      duration                = "${var.slo_window_seconds}s"
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
      aggregations {
        alignment_period     = "60s"
        per_series_aligner   = "ALIGN_DELTA"
        cross_series_reducer = "REDUCE_PERCENTILE_99"
        group_by_fields      = local.by_service
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "The 99th percentile latency of $${resource.label.service_name} stayed above ${var.slo_latency_p99_ms} ms for ${var.slo_window_seconds} s. Check the dashboard's instances and 429 charts (scaling at max_instances, a full queue) and cold starts (min_instances)."
  }

  depends_on = [google_project_service.enabled]
}

resource "google_monitoring_alert_policy" "uptime" {
  count = length(local.uptime_services) > 0 ? 1 : 0

  project               = var.project_id
  display_name          = "${var.name_prefix}: /v1/health failing"
  combiner              = "OR"
  notification_channels = var.monitoring_notification_channels
  user_labels           = local.labels

  conditions {
    display_name = "uptime check failing from more than one region"
    condition_threshold {
      filter     = "metric.type=\"monitoring.googleapis.com/uptime_check/check_passed\" AND resource.type=\"uptime_url\" AND metric.labels.check_id=one_of(${join(",", [for c in google_monitoring_uptime_check_config.health : "\"${c.uptime_check_id}\""])})"
      comparison = "COMPARISON_GT"
      # More than one region failing: one region's network trouble alone does not page.
      threshold_value = 1
      duration        = "${max(var.slo_window_seconds, 2 * tonumber(trimsuffix(var.monitoring_uptime_period, "s")))}s"
      aggregations {
        alignment_period     = "1200s"
        per_series_aligner   = "ALIGN_NEXT_OLDER"
        cross_series_reducer = "REDUCE_COUNT_FALSE"
        group_by_fields      = ["metric.label.check_id"]
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "GET /v1/health fails from more than one checker region. 503 not_ready: the model did not load (the revision's startup log says why); 401/403: the Monitoring service agent lost roles/run.invoker."
  }
}
