"""Small runtime helpers."""

from .runtime import configure_cpu, resolve_device, seed_everything

__all__ = ["configure_cpu", "resolve_device", "seed_everything"]
