"""moefy: turn dense pretrained transformers into real, faster Mixture-of-Experts models
without retraining their weights (Generalized MoEfication, EMNLP 2024), and see what happened."""

__version__ = "0.1.0"
