"""The HTTP edge: start-up, routing, bodies, API keys, rate limits, OpenAPI, metrics, and the one
table of error type to status code."""
