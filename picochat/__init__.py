"""picochat: train your own ChatGPT-like model from scratch, end to end."""
__version__ = "0.1.0"
