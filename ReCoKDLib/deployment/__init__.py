"""Deployment: model bundles (``.recokd``: network, weights, plans, labels, provenance; checked on load)
and the checksum-verified model registry with its per-user cache. No torch at import."""
