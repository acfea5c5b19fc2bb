"""The ComfyUI side of the pack: node classes, the attention override, run reports and
HTTP routes. Imports ComfyUI; the `attention` library next to it never does."""
