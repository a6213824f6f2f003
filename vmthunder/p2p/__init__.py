"""Peers: membership (tooz), peer selection and peer fetch."""
