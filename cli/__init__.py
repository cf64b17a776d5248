"""adaflex."""
