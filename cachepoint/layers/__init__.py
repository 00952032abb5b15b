"""Layers: ingest, export, diff and compositing of versions."""
