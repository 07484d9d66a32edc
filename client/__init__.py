"""duo's client: the orchestrator that drives a draft service session and the ``duo-client`` CLI."""
