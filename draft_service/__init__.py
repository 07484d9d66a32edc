"""duo's draft service: runs the draft model (CPU) and the speculative loop against a verify service."""
