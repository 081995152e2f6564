"""The application layer: the command line, the demo, the decode benchmark, model loading and
the built-in model's training script. It sits above the library (it imports everything; no
library module imports it)."""
