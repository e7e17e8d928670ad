"""Pipeline stages, one a module: listing, embed, reduce, and run (which commits a whole run)."""
