"""A small recipe that extends atropos-verl, as another project would write it (used by
tests/e2e/test_extension_e2e.py, which copies this folder outside the repository and runs it from there)."""
