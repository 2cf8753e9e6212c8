"""Hydra configs, installed as `dlr.configs`. Importing registers the schemas (dlr/schema.py)."""
from dlr.schema import register

register()
