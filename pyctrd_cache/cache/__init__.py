"""The cache core: the manager, its records and handles, and the blob work they share.

Package-private: nothing here is public API (the public names are re-exported by
`pyctrd_cache`, `pyctrd_cache.manager`, `pyctrd_cache.refs` and
`pyctrd_cache.remote_snapshots`). The modules of this package may read each other's
underscore names; no module outside it may (tests/unit/test_private_names.py), and this
package imports no grpc or protobuf (docs/architecture.md, checked by `lint-imports`).
"""

__all__: list[str] = []
