"""Online scoring behind the BentoML service: requests, scorer, batching, prediction log, auth, settings."""
