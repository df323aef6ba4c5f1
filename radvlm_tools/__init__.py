"""Tools built on the core (docs/design.md): evaluation, drawing, inference, trace synthesis, the demo; each runs as
``python -m radvlm_tools.<tool>``."""
