"""How good is each influence method's answer? Measured on the user's own problem.

- :func:`evaluate`: the linear datamodeling score (LDS; Park et al. 2023, "TRAK") of every method,
  with a bootstrap interval, and flipped-label detection (ROC AUC, precision at k) from
  self-influence and from validation influence; retrainings in worker processes, cached on disk.
- :class:`Problem`: what it needs: ``train(indices, seed) -> model``, the data (x a tensor, a
  tuple or a dict of inputs, as anywhere in twicediff), the measurement (test loss or margin).
- :data:`METHODS`: the methods compared, one line each; :func:`digits_problem`: the demo's digits.
- :mod:`twicediff.evaluate.lds`: the score itself and its sign convention.
"""
from .core import Evaluation, evaluate, point_gradients  # noqa: F401
from .digits import DigitsTrainer, digits_problem  # noqa: F401
from .lds import bootstrap_ci, lds, predict_subsets, sample_subsets, spearman_per_column  # noqa: F401
from .methods import METHODS, QUICK_METHODS, available_methods, describe, identity, solver  # noqa: F401
from .problem import PointLoss, Problem, margin  # noqa: F401
from .retrain import retrain_measurements  # noqa: F401
