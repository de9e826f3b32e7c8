"""The harness: RULER's scripts (eval/ruler/) and what they need beside the methods (model loading, CLI helpers,
the method registry, sweeps). Installed with the project (``pip install -e .``), so scripts import it by name."""
