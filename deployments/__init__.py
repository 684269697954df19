"""Deployments, their settings, and the local stack (Prefect server, workers, S3 endpoint)."""
