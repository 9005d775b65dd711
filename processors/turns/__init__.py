"""The turns processor: admission of what people say (rate limit, input checks, language)."""
