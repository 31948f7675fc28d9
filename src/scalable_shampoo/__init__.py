"""scalable-shampoo: Shampoo (Anil et al., arXiv 2002.09018) for PyTorch."""

from .background import BackgroundRoots, InlineRoots, RootScheduler
from .grafting import GraftingType
from .groups import PlanTable, param_groups_for
from .matrix_roots import RootMethod, inverse_root
from .optimizer import NonFiniteGrad, Preconditioner, Shampoo
from .state import FORMAT_VERSION, atomic_save

__all__ = [
    "FORMAT_VERSION",
    "GraftingType",
    "BackgroundRoots",
    "InlineRoots",
    "NonFiniteGrad",
    "PlanTable",
    "Preconditioner",
    "RootMethod",
    "RootScheduler",
    "Shampoo",
    "atomic_save",
    "inverse_root",
    "param_groups_for",
]
__version__ = "0.1.0"
