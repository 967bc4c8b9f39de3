"""Input: streaming libsvm/Criteo readers, generated data with a planted model, batches."""
from jaxps.data.batch import Batch
from jaxps.data.dataset import FileDataset
from jaxps.data.readers import DataError, ReaderConfig, ReadStats, batches, prefetch, read_examples
from jaxps.data.synthetic import PlantedModel, SyntheticConfig, generate_dataset, write_libsvm

__all__ = ["Batch", "DataError", "FileDataset", "PlantedModel", "ReadStats", "ReaderConfig",
           "SyntheticConfig", "batches", "generate_dataset", "prefetch", "read_examples", "write_libsvm"]
