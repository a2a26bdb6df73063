"""``POST /v1/tokenize``: the token ids and texts of a prompt."""
