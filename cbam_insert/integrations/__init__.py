"""Integrations with the libraries where patched models are trained, deployed and shared:
``cbam_insert.integrations.ultralytics`` (YOLO) and ``cbam_insert.integrations.transformers``
(Hugging Face). Each imports its library only when used."""
