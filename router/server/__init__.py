"""The HTTP server side: the uvicorn protocol adapter, the fast path, the ASGI app and its routes."""
