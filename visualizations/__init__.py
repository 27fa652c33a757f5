"""Visualization methods. Discovery is explicit: each method module is imported and registered
here (as captum's ``attr/__init__.py`` does); no folder scanning."""
from visualizations.base import Visualization, visualization_registry

__all__ = ["Visualization", "visualization_registry"]
