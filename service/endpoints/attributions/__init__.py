"""``POST /v1/attributions``: decompose a forward pass into components and score them."""
