"""The thin high-level layer (installed as unlearn_engine.api): command line, model loading, loops."""
