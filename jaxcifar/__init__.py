"""jaxcifar: functional JAX/Flax training for CIFAR-10/100."""

from jaxcifar._xla import configure_xla_cpu

configure_xla_cpu()

from jaxcifar.errors import CheckpointError, ConfigError, DataError, JaxCifarError, TrainingError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "DataError", "JaxCifarError", "TrainingError", "__version__"]
