"""Operator tools for a multi-machine Flower deployment (``python -m deploy.kit --help``)."""
