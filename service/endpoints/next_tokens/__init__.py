"""``POST /v1/next_tokens``: the model's most likely next tokens at some positions."""
