"""AudioBERT, pitch task, at the original's sizes and settings: `configs/audiobert.py:pitch`
(see there for the paths to fill; `configs/audiobert.py:pitch_text` is its text-only row)."""
from configs import audiobert


def get_config():
    return audiobert.get_config("pitch")
