"""Prometheus metrics of the daemon (node.py) and their exposition at ``/metrics`` (exposition.py;
served by cachepoint/http/metrics.py). The coordinator's are in coordinator/metrics.py."""
