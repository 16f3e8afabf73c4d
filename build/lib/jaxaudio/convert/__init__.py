"""Checkpoint conversion: one engine, one declarative key map per source format."""
from jaxaudio.convert.engine import ConversionError, Ignore, KeyMap, Merge, Rule, convert, flatten, unflatten
from jaxaudio.convert.io import load_converted, load_state_dict, save_converted
