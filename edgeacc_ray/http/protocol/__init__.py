"""Request shapes of the HTTP API, per API: `openai.py` and `sglang.py`; `common.py` is what both share."""
