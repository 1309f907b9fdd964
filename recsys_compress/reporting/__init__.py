"""Tables and plots built from many runs' ``results.json``."""
