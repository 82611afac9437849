"""The method and the models every family shares: read top to bottom."""
