"""stream-learner: production online learning for transformers, fed by Kafka."""

__version__ = "0.1.0"
