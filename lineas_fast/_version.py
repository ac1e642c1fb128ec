"""Single source of the library version (read by setup.py and stored in every artifact)."""
__version__ = "0.1.0"
