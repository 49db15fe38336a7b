"""Everything the migrations must build: the store's tables and every read model's."""

import projections.readmodels  # noqa: F401 -- defining the read models registers their tables
from eventstore.schema import metadata as store_metadata
from projections.projector import metadata as read_model_metadata

target_metadata = [store_metadata, read_model_metadata]

__all__ = ["target_metadata"]
