"""duo's verify service: runs the target model (GPU when present) and verifies proposed token trees."""
