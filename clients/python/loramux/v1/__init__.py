"""Generated from proto/loramux/v1 by `make proto`; do not edit."""
