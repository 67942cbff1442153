"""Approximate unlearning methods and unlearning metrics (pure PyTorch + scikit-learn)."""
