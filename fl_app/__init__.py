"""Flower entry points: the ServerApp, the ClientApp and the reading of run_config."""
