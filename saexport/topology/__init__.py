"""WEST threshold maps, FAST budgets, and their file formats."""
