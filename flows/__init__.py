"""Prefect flows (train, screen, evaluate, audit, synthesize, demo), each a plain Python function."""
