"""OpenAI's audio API in front of the router's deployments (speech, transcriptions, translations).

Submodules are imported by name (``router.audio._api``): this package's ``__init__`` stays empty,
so provider adapters can use its multipart codec without importing the inbound APIs.
"""
