"""``/health``, ``/ready`` and ``/metrics``: liveness, readiness and Prometheus metrics."""
