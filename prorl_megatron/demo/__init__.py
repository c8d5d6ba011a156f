"""The embedded CPU demo: its tiny base model and summary."""
