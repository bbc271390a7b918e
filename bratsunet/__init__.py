"""The library beneath the scripts: one module per subject (settings, conventions, cases, network, inference, ...).
It never imports a script; docs/design.md draws the layers."""
