"""Deployments: a model served on N dedicated instances, each a long-running task fed from a Redis stream."""
