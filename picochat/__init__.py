"""picochat: train your own ChatGPT-like model from scratch, end to end."""
from pathlib import Path

__version__ = "0.1.0"
PACKAGE_DIR = Path(__file__).resolve().parent  # package data (ui.html, data/, hf_modeling.py) lives here
