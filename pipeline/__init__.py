"""A distributed BERT/GPT pretraining pipeline: Ray stages, DeepSpeed training, W&B evaluation."""

__version__ = "0.1.0"
