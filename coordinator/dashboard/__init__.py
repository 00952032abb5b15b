"""The coordinator's dashboard: one page at ``/`` over one JSON snapshot, ``GET /v1/dashboard``."""
