"""A screening run's state and outputs: the results contract, the ledger, run leases, reports, drift."""
