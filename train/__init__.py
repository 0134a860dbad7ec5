"""The trainer: python -m train (and python -m train.plan, the cluster cost model)."""
