"""Shared core: settings, base-model resolution, the error vocabulary."""
