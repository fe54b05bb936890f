"""Images on their way to the model: where their bytes come from, fetching URLs, decoding safely."""
