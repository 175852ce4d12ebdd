"""Command-line programs: brain-ldm-convert and the BIDS App brain-ldm-bids."""
