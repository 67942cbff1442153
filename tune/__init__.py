"""The Ray Tune + MLflow edge: approximate methods compared with exact SISA unlearning."""
