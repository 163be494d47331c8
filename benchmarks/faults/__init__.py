"""The cases and harness of benchmarks/fault_injection.py."""
