"""observer.proto and the Python modules `make proto` generates from it (not committed)."""
