"""Benchmarks and tools, run as files (``python scripts/NAME.py``); a package only so that tests can
import ``scripts.server_health`` ahead of any installed top-level ``scripts``."""
