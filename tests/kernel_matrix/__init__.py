"""Kernel matrix: the host's build and tests run again on a second kernel (Debian 6.1) under qemu."""
