"""The HTTP front door: validates requests, enqueues them for the workers, answers OpenAI-style."""
