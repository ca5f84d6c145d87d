"""Writing a step's new K/V into the paged cache: reference (XLA scatter) and Pallas kernel."""
