"""The Prefect task wrappers of the flows: each step a flow names, with its retries and timeouts."""
