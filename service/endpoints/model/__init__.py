"""``GET /v1/model``: the loaded model's facts and the limits in force."""
