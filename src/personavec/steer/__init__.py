"""Stage 3: steer with a vector (read-back, the dose-response sweep and its choice, the demo)."""
