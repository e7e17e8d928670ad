"""Which fruit is this: a classifier trained on a run's embeddings, evaluated, and exported as one ONNX file."""

from fruitpipe.classify.settings import TrainSettings
from fruitpipe.classify.train import train

__all__ = ["TrainSettings", "train"]
