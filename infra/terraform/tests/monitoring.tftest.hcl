# Operations as code (monitoring.tf): the dashboard reads only metrics that exist, the alerts
# follow the SLO variables, the uptime checks call each private function's health endpoint with
# the Monitoring service agent's token, and monitoring_enabled = false removes all of it.

mock_provider "google" {
  mock_resource "google_redis_instance" {
    defaults = {
      host            = "10.9.0.3"
      port            = 6378
      auth_string     = "mock-auth-string"
      server_ca_certs = [{ cert = "-----BEGIN CERTIFICATE-----\nMOCK\n-----END CERTIFICATE-----\n", create_time = "", expire_time = "", serial_number = "1", sha1_fingerprint = "" }]
    }
  }
  mock_resource "google_service_account" {
    defaults = {
      email  = "mock@example-project.iam.gserviceaccount.com"
      member = "serviceAccount:mock@example-project.iam.gserviceaccount.com"
    }
  }
  mock_resource "google_compute_network" {
    defaults = { id = "projects/example-project/global/networks/aifn-vpc" }
  }
  mock_resource "google_compute_subnetwork" {
    defaults = { id = "projects/example-project/regions/europe-west1/subnetworks/aifn-run" }
  }
  mock_resource "google_secret_manager_secret_version" {
    defaults = { version = "1" }
  }
  mock_resource "google_cloud_run_v2_service" {
    defaults = { uri = "https://aifn-function-abc123-ew.a.run.app" }
  }
  mock_resource "google_monitoring_uptime_check_config" {
    defaults = { uptime_check_id = "aifn-health-check" }
  }
  mock_data "google_project" {
    defaults = { number = "123456789" }
  }
  mock_data "google_storage_project_service_account" {
    defaults = { member = "serviceAccount:service-123@gs-project-accounts.iam.gserviceaccount.com" }
  }
}

variables {
  project_id = "example-project"
  image_tag  = "c0ffee1"
  # The IAM propagation wait (a local sleep before the Eventarc triggers) is for real projects.
  iam_propagation_wait_seconds = 0
}

run "dashboard_reads_only_emitted_metrics" {
  command = plan

  assert {
    condition     = length(google_monitoring_dashboard.functions) == 1
    error_message = "One dashboard per deployment by default."
  }
  assert {
    condition = toset([for t in jsondecode(google_monitoring_dashboard.functions[0].dashboard_json).mosaicLayout.tiles : t.widget.title]) == toset([
      "Requests per second",
      "Latency p50 / p99 (ms)",
      "4xx and 5xx per second",
      "429 per second (Cloud Run and function; causes in the next chart)",
      "Error answers by type per second (overloaded, rate_limited, deadline_exceeded...)",
      "Prediction-cache hit ratio (cached / predicted texts)",
      "5xx ratio",
      "Instances",
      "Batch files processed per minute",
      "Batch lines per file (mean): read, predicted, errors",
      "Batch prediction-cache hit ratio (cached / predicted texts)",
    ])
    error_message = "The dashboard must chart requests, p50/p99 latency, 4xx/5xx, 429 and error causes, the cache hit ratio, instances, and the batch files, lines and cache hit ratio."
  }
  # Every metric type a chart reads is Cloud Run's own or a log-based metric this module defines.
  assert {
    condition = alltrue(flatten([
      for t in jsondecode(google_monitoring_dashboard.functions[0].dashboard_json).mosaicLayout.tiles : [
        for ds in t.widget.xyChart.dataSets : [
          for f in compact([
            try(ds.timeSeriesQuery.timeSeriesFilter.filter, ""),
            try(ds.timeSeriesQuery.timeSeriesFilterRatio.numerator.filter, ""),
            try(ds.timeSeriesQuery.timeSeriesFilterRatio.denominator.filter, ""),
            ]) : contains(concat(
            ["run.googleapis.com/request_count", "run.googleapis.com/request_latencies", "run.googleapis.com/container/instance_count"],
            [for m in concat(google_logging_metric.request_errors, values(google_logging_metric.http), google_logging_metric.batch_files, values(google_logging_metric.batch)) : "logging.googleapis.com/user/${m.name}"],
          ), regex("metric.type=\"([^\"]+)\"", f)[0])
        ]
      ]
    ]))
    error_message = "A dashboard chart reads a metric that is neither Cloud Run's nor a log-based metric defined in monitoring.tf."
  }
  assert {
    condition     = strcontains(google_monitoring_dashboard.functions[0].dashboard_json, "resource.labels.service_name=one_of(\\\"aifn-sentiment\\\",\\\"aifn-classify\\\")") || strcontains(google_monitoring_dashboard.functions[0].dashboard_json, "resource.labels.service_name=one_of(\\\"aifn-classify\\\",\\\"aifn-sentiment\\\")")
    error_message = "The HTTP charts must select this deployment's HTTP services by name."
  }
}

run "log_based_metrics_select_the_functions_log_lines" {
  command = plan

  assert {
    condition     = strcontains(google_logging_metric.request_errors[0].filter, "jsonPayload.logger=\"aifn.request\" AND jsonPayload.error_type:*") && google_logging_metric.request_errors[0].label_extractors.error_type == "EXTRACT(jsonPayload.error_type)"
    error_message = "Error answers are counted from the request log's error_type, by type."
  }
  assert {
    condition = toset(keys(google_logging_metric.http)) == toset(["texts", "cached"]) && alltrue([for m in values(google_logging_metric.http) :
      strcontains(m.filter, "jsonPayload.logger=\"aifn.request\" AND jsonPayload.texts:*") && m.value_extractor == "EXTRACT(jsonPayload.${trimprefix(m.name, "aifn_http_")})"
    ])
    error_message = "The HTTP cache hit ratio reads each answered prediction's texts and cached counts from the request log."
  }
  assert {
    condition     = toset(keys(google_logging_metric.batch)) == toset(["lines", "predictions", "line_errors", "cached"])
    error_message = "The batch summary gives lines, predictions, error lines and cached texts per file."
  }
  assert {
    condition = alltrue([for m in concat(values(google_logging_metric.batch), google_logging_metric.batch_files) :
      strcontains(m.filter, "one_of(\"aifn-sentiment-batch\",\"aifn-classify-batch\")") || strcontains(m.filter, "one_of(\"aifn-classify-batch\",\"aifn-sentiment-batch\")")
    ])
    error_message = "Batch metrics must read the batch services' logs only."
  }
  assert {
    condition     = google_logging_metric.batch["cached"].value_extractor == "REGEXP_EXTRACT(jsonPayload.message, \"([0-9]+) from the cache[)]$\")"
    error_message = "The cached count is read from the summary message's end."
  }
}

run "uptime_checks_call_private_health_endpoints_with_the_agents_token" {
  command = apply

  assert {
    condition     = toset(keys(google_monitoring_uptime_check_config.health)) == toset(["sentiment", "classify"])
    error_message = "One uptime check per HTTP function (none on the internal batch services)."
  }
  assert {
    condition = alltrue([for c in google_monitoring_uptime_check_config.health :
      c.http_check[0].path == "/v1/health" && c.http_check[0].request_method == "GET" &&
      c.http_check[0].use_ssl == true && c.http_check[0].port == 443 &&
      c.http_check[0].service_agent_authentication[0].type == "OIDC_TOKEN" &&
      c.monitored_resource[0].type == "uptime_url" &&
      c.monitored_resource[0].labels.host == "aifn-function-abc123-ew.a.run.app" &&
      c.content_matchers[0].content == "\"status\":\"ok\""
    ])
    error_message = "Uptime checks: HTTPS GET /v1/health on the service's host, the Monitoring agent's OIDC token, a healthy body."
  }
  assert {
    condition = toset([for m in google_cloud_run_v2_service_iam_member.uptime_invoker : "${m.name} ${m.role} ${m.member}"]) == toset([
      "aifn-sentiment roles/run.invoker serviceAccount:service-123456789@gcp-sa-monitoring-notification.iam.gserviceaccount.com",
      "aifn-classify roles/run.invoker serviceAccount:service-123456789@gcp-sa-monitoring-notification.iam.gserviceaccount.com",
    ])
    error_message = "The Monitoring service agent, and only it, may invoke the HTTP functions for the checks."
  }
  assert {
    condition     = strcontains(google_monitoring_alert_policy.uptime[0].conditions[0].condition_threshold[0].filter, "metric.labels.check_id=one_of(\"aifn-health-check\",\"aifn-health-check\")")
    error_message = "The uptime alert must watch this deployment's checks."
  }
}

run "alerts_follow_the_slo_defaults" {
  command = plan

  assert {
    condition = (abs(google_monitoring_alert_policy.error_ratio[0].conditions[0].condition_threshold[0].threshold_value - 0.01) < 1e-9 &&
      google_monitoring_alert_policy.error_ratio[0].conditions[0].condition_threshold[0].duration == "300s" &&
      strcontains(google_monitoring_alert_policy.error_ratio[0].conditions[0].condition_threshold[0].filter, "metric.labels.response_code_class=\"5xx\"") &&
    !strcontains(google_monitoring_alert_policy.error_ratio[0].conditions[0].condition_threshold[0].denominator_filter, "response_code"))
    error_message = "Default error alert: 5xx over all requests above 1% (slo_availability 0.99) for 5 minutes."
  }
  assert {
    condition = (google_monitoring_alert_policy.latency[0].conditions[0].condition_threshold[0].threshold_value == 2000 &&
      google_monitoring_alert_policy.latency[0].conditions[0].condition_threshold[0].aggregations[0].cross_series_reducer == "REDUCE_PERCENTILE_99" &&
    strcontains(google_monitoring_alert_policy.latency[0].conditions[0].condition_threshold[0].filter, "run.googleapis.com/request_latencies"))
    error_message = "Default latency alert: p99 of Cloud Run's request latency above 2000 ms."
  }
  assert {
    condition     = length(google_monitoring_alert_policy.error_ratio[0].notification_channels) == 0
    error_message = "No notification channel unless given."
  }
}

run "alerts_follow_the_slo_variables" {
  command = plan

  variables {
    slo_availability                 = 0.999
    slo_latency_p99_ms               = 800
    slo_window_seconds               = 600
    monitoring_notification_channels = ["projects/example-project/notificationChannels/42"]
  }

  assert {
    condition = (abs(google_monitoring_alert_policy.error_ratio[0].conditions[0].condition_threshold[0].threshold_value - 0.001) < 1e-9 &&
      google_monitoring_alert_policy.error_ratio[0].conditions[0].condition_threshold[0].duration == "600s" &&
      google_monitoring_alert_policy.latency[0].conditions[0].condition_threshold[0].threshold_value == 800 &&
    google_monitoring_alert_policy.latency[0].conditions[0].condition_threshold[0].duration == "600s")
    error_message = "Thresholds and durations must come from slo_availability, slo_latency_p99_ms and slo_window_seconds."
  }
  assert {
    condition = alltrue([for p in concat(google_monitoring_alert_policy.error_ratio, google_monitoring_alert_policy.latency) :
    toset(p.notification_channels) == toset(["projects/example-project/notificationChannels/42"])])
    error_message = "Every alert policy must notify the given channels."
  }
}

run "monitoring_off_creates_nothing" {
  command = plan

  variables {
    monitoring_enabled = false
  }

  assert {
    condition = (length(google_monitoring_dashboard.functions) + length(google_monitoring_alert_policy.error_ratio) +
      length(google_monitoring_alert_policy.latency) + length(google_monitoring_alert_policy.uptime) +
      length(google_monitoring_uptime_check_config.health) + length(google_cloud_run_v2_service_iam_member.uptime_invoker) +
    length(google_logging_metric.request_errors) + length(google_logging_metric.http) + length(google_logging_metric.batch_files) + length(google_logging_metric.batch)) == 0
    error_message = "monitoring_enabled = false must create no dashboard, alert, uptime check, agent binding or log-based metric."
  }
}

run "no_uptime_checks_behind_internal_ingress" {
  command = plan

  variables {
    ingress = "INGRESS_TRAFFIC_INTERNAL_ONLY"
  }

  assert {
    condition     = length(google_monitoring_uptime_check_config.health) == 0 && length(google_cloud_run_v2_service_iam_member.uptime_invoker) == 0 && length(google_monitoring_alert_policy.uptime) == 0
    error_message = "Uptime checkers call from the internet: none (and no agent binding) when ingress is internal."
  }
  assert {
    condition     = length(google_monitoring_dashboard.functions) == 1 && length(google_monitoring_alert_policy.error_ratio) == 1
    error_message = "The dashboard and SLO alerts do not depend on ingress."
  }
}

run "public_services_need_no_agent_binding" {
  command = plan

  variables {
    allow_unauthenticated = true
  }

  assert {
    condition     = length(google_monitoring_uptime_check_config.health) == 2 && length(google_cloud_run_v2_service_iam_member.uptime_invoker) == 0
    error_message = "With allUsers invoking, the checks run without granting the agent anything."
  }
}

run "without_batch_no_batch_metrics" {
  command = plan

  variables {
    batch = { enabled = false }
  }

  assert {
    condition     = length(google_logging_metric.batch) == 0 && length(google_logging_metric.batch_files) == 0
    error_message = "No batch services, no batch log metrics."
  }
  assert {
    condition     = !strcontains(google_monitoring_dashboard.functions[0].dashboard_json, "_batch_")
    error_message = "Without batch services the dashboard must not chart batch metrics (they would never exist)."
  }
}

run "rejects_an_slo_of_one" {
  command = plan
  variables {
    slo_availability = 1
  }
  expect_failures = [var.slo_availability]
}

run "rejects_an_uptime_period_monitoring_lacks" {
  command = plan
  variables {
    monitoring_uptime_period = "120s"
  }
  expect_failures = [var.monitoring_uptime_period]
}
