"""sisa-ray: exact machine unlearning with SISA ensembles on Ray."""

from .core.config import ResourceConfig, ShardingConfig, SISAConfig, TrainingConfig
from .core.data import SampleSet

__all__ = [
    "ResourceConfig", "SampleSet", "SISAConfig", "SISAEnsemble", "ShardingConfig",
    "TrainingConfig",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The facade imports torchvision models lazily, keeping `import sisa_ray` light.
    if name == "SISAEnsemble":
        from .ensemble import SISAEnsemble

        return SISAEnsemble
    raise AttributeError(name)
