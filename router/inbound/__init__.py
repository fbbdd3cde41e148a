"""Inbound APIs: the dialects clients speak, each translated to and from the router's core."""
