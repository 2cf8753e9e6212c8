"""Hydra configs, installed as `dlr.configs`. Importing registers the schemas (dlr/config/)."""
from dlr.config import register

register()
