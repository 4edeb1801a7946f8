"""Shared core used by both the server and the shards: UNet factory, noise schedule, data sets."""
