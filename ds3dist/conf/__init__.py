"""Hydra configuration tree for `python -m ds3dist.launch` (YAML files; see config.yaml)."""
