"""Everything the migrations must build: the store's tables and every read model's."""

from eventstore.schema import metadata as target_metadata

__all__ = ["target_metadata"]
