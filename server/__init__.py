"""faceverify: gRPC face verification for KYC."""

__version__ = "0.1.0"
