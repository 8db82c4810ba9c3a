"""``hf-paged serve``: an OpenAI-compatible HTTP server over ``AsyncEngine`` (needs ``pip install 'hf_paged[serve]'``).

- ``protocol``: request bodies (pydantic) and OpenAI's error shape;
- ``app``: the FastAPI app (``build_app(engine, model_name, api_keys)``);
- ``metrics``: the Prometheus registry behind ``/metrics``;
- ``main``: the engine (in a process of its own by default, ``AsyncEngine.from_spec``), the uvicorn
  server, graceful shutdown.
"""
