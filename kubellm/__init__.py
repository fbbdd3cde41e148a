"""kubellm: a Kubernetes-native, OpenAI-compatible LLM router."""

__version__ = "0.1.0"
