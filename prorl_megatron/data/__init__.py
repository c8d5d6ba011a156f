"""Prompt data: one schema for all domains, loading from local files, mixing, chat templates."""
