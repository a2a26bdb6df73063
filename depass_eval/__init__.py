"""The DePass paper's evaluation suite, runnable on any model the engine supports.

Four protocols (``depass-eval --protocol ...``): ``tokens`` (patch-top / recover-top of
token rankings against attention, gradient and occlusion baselines, paper 4.1.1),
``truth`` (a truthfulness probe's subspace attributed to input tokens, 4.1.2),
``components`` (zeroing the top heads and neurons, 4.2) and ``language`` (a language
subspace carried to the output, 4.3). See docs/evaluation.md.

Nothing in ``engine`` or ``service`` imports this package; it needs the ``eval`` extra
(captum, matplotlib, scikit-learn, tqdm).
"""

from depass_eval.suite import PROTOCOLS, run_protocol

__all__ = ["PROTOCOLS", "run_protocol"]
