"""Dataset-scale DePass attribution (``depass-batch``): rows of requests in, Parquet out.

In-process or on a Ray Data actor pool (one engine per actor), the same worker code:
:mod:`depass_batch.rows` (the output schema, from the engine's dataclasses),
:mod:`depass_batch.worker` (an engine answering batches of rows), :mod:`depass_batch.io`
(input files, shards and manifest, resume by id), :mod:`depass_batch.runner` (where the
workers run) and :mod:`depass_batch.cli`. Needs pyarrow (``pip install
'depass-serve[batch]'``; Ray: ``'depass-serve[ray]'``); the engine stays free of both.
"""
