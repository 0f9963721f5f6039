"""Deployments: a model served on N dedicated instances, each its own OS process fed from a Redis stream."""
