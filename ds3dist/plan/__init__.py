"""The cluster planner (python -m ds3dist.plan): per-rank bytes, traffic and a roofline of a
layout on a described cluster, and a search over layouts ranked by completion tokens/s."""
