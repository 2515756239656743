"""Flower app for edgefed's side-by-side benchmark (runs only in the Flower venv)."""
