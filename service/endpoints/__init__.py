"""The endpoints: one subpackage each, vLLM-style, on the shared base of :mod:`service`.

Each subpackage holds ``protocol.py`` (its pydantic bodies), ``serving.py`` (a
:class:`service.serving.Serving` subclass that calls the engine) and ``api_router.py``
(its FastAPI routes, as ``router``); :data:`service.api_router.ENDPOINTS` includes them.
"""
