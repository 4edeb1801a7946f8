"""The ``iet-agc`` command: run, evaluate, sweep (``iet_agc.cli.main``)."""
