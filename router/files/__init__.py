"""OpenAI's files and batches APIs in front of OpenAI and Azure OpenAI deployments."""
