"""The package version, in a module of its own so anything may import it without pulling in
the app package's factory (``from app import __version__`` would close an import circle)."""
__version__ = "0.1.0"
