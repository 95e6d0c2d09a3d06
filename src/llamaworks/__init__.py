"""llamaworks: own an open LLaMA-family chatbot end to end."""

__version__ = "0.1.0"
