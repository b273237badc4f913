"""The HTTP API (OpenAI + SGLang-native) as one FastAPI app over any engine client.

Find an endpoint by its name: `routes/chat.py` (/v1/chat/completions), `routes/completions.py`
(/v1/completions), `routes/generate.py` (SGLang /generate), `routes/admin.py` (models, health,
server info, cache, metrics). Request shapes are `protocol/openai.py` and `protocol/sglang.py`;
`preprocess.py` turns a request into engine requests (the one place limits are applied);
`engine_request.py` runs them; `errors.py` maps every failure to an OpenAI-style error; `app.py`
assembles it all (`build_api`).
"""
