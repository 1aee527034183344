"""The deploy run: its phases, connecting and waiting, the lock, the cluster key, Ray's settlement, the report."""
