"""What operators watch: the access log (one line per request), Prometheus metrics, the request id."""
