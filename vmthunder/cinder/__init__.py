"""Cinder-side pieces of vmthunder (loaded by cinder-volume)."""
