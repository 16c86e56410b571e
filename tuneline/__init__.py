"""tuneline: a repeatable fine-tuning pipeline over the OpenAI fine-tuning API."""

__version__ = "0.1.0"
