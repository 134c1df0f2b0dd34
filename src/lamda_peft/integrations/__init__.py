"""Glue to distributed and quantization back ends that stay optional dependencies."""
