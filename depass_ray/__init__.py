"""DePass Serve on Ray: the service as a Ray Serve deployment (:mod:`depass_ray.serve`).

Kept apart from ``service/`` so that the service and its image need no Ray; install the
``ray`` extra (``pip install 'depass-serve[ray]'``). Batch attribution on Ray Data is
``depass-batch --ray`` (:mod:`depass_batch`).
"""
