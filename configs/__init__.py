"""The shipped serve configs (installed as ``jaxserve.configs``; ``--config NAME.yaml`` finds them)."""
