"""What the element says about itself: logs (text or JSON), Prometheus metrics (one
registry per app) and optional OpenTelemetry tracing."""
