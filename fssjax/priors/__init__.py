"""The language side: LLM clients, class descriptions, related classes, text encoders."""
