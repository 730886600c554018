"""LLM requests: the OpenAI-compatible client, prompt templates, structured output."""
