"""The enclave side: the pool key, the model and the job loop."""
