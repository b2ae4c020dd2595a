"""deepkern microbenchmarks: `python -m deepkern.bench` (see bench/__main__.py)."""
