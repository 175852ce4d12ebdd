"""Command-line programs: brain-ldm-convert (and, later, the BIDS App)."""
