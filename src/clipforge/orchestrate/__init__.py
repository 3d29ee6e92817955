"""Pipelines: a spec of stages -> ordered stage runs, locally or as Kubernetes Jobs."""
