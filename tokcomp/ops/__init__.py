"""Pure tensor algorithms used by strategies and adapters; no model knowledge here."""
