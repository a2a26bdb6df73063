"""``POST /v1/generate``: generate tokens and attribute each one to the tokens before it."""
