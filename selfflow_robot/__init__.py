"""selfflow-robot: Self-Flow video-action world models and policies for robots."""
__version__ = "0.1.0"
