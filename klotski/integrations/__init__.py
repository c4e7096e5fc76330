"""Klotski inside other engines: :mod:`klotski.integrations.transformers` (Hugging Face transformers 5.x)."""
