"""``adapterkit serve``: many adapters on one base model behind an OpenAI-compatible HTTP server.

``app.py`` builds the FastAPI application (vLLM's LoRA contract plus
``/v1/classify``, ``/v1/tag`` and ``/v1/answer``); ``engine.py`` runs
generation requests for different adapters together, one decoding step at a
time; ``encoder.py`` does the same for encoder tasks; ``run.py`` starts
uvicorn. The server composes the library; it holds no modelling logic.
"""
