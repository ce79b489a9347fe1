"""The demo world, apart from the library: tiny models built from transformers configs (toy) and the
safety-mirage world that `unlearn-engine demo` runs (mirage). Library code never imports this package."""
