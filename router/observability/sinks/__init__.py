"""What the observability sinks send: one record per finished request, and its vendor shapes.

:mod:`kubellm.router.observability._hub` runs the sinks; this package only turns records into wire formats.
"""
