"""The CLAP audio retrieval index: build (resumable), save, load, append, exact top-k by
cosine on one device or sharded over a mesh (`search.top_k_cosine`).

The index and the build need numpy only; jax is imported when something is searched (the
names of `search` are loaded on first use).
"""

from jaxaudio.retrieval.build import (
    AUDIO_EXTENSIONS, BuildError, BuildSummary, append_clips, build_index, clips_from_folder,
    clips_from_manifest)
from jaxaudio.retrieval.index import (
    ClapIndex, ClapIndexError, build_identity, header_difference, make_header, model_identity)

_SEARCH_NAMES = ("PreparedDatabase", "SearchError", "normalize_rows", "prepare_database",
                 "top_k_cosine")


def __getattr__(name):
    if name in _SEARCH_NAMES:
        from jaxaudio.retrieval import search
        return getattr(search, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AUDIO_EXTENSIONS", "BuildError", "BuildSummary", "ClapIndex", "ClapIndexError",
    "append_clips", "build_identity", "build_index", "clips_from_folder", "clips_from_manifest",
    "header_difference", "make_header", "model_identity", *_SEARCH_NAMES,
]
