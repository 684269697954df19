"""What the product keeps: storage locations (one backend per scheme), the model store, engines
records, site evaluations, generators and datasets."""
