"""camscope: GradCAM, LayerCAM and Focus LayerCAM at every layer, label and input of an image model."""

from camscope.algorithms import ALGORITHM_TITLES, ALGORITHMS
from camscope.engine import CamEngine, Explanation
from camscope.graph import LayerInfo

__all__ = ["ALGORITHMS", "ALGORITHM_TITLES", "CamEngine", "Explanation", "LayerInfo"]
__version__ = "0.1.0"
