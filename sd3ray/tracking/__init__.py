"""Experiment tracking: the protocol the loop logs through (`protocol`), MLflow on rank 0 (`mlflow_tracker`), the
outbox that survives a tracking-server outage (`outbox`), system metrics, the pyfunc model and the registry.
"""
