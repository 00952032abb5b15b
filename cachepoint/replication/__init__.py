"""Replication: planning, verified parallel fetching from several sources, pulling and publishing."""
