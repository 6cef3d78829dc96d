"""Moving weights between gptlab and other ecosystems (Hugging Face transformers)."""
